# The two commands of the README: `make run` (set up, then the main job) and `make test`.
PYTHON ?= python
FLWR := FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr

.PHONY: setup run test test-fast test-integration

setup:
	$(PYTHON) -m pip install -q --disable-pip-version-check torch==2.13.0 -e ".[test]"

# Split-KD on digits, 20 simulated devices (a SuperNode each), 25 rounds. `flwr run` starts a
# local SuperLink that keeps running afterwards (Flower's behaviour): stop it by its PID.
run: setup
	$(FLWR) run . --stream --federation-config "num-supernodes=20 client-resources-num-cpus=1"

# Two workers, a test module at a time each (pytest-xdist): a Flower run mostly waits on Ray's
# start and the engine's polls, so the other worker's tests fill that time (13 min -> 9.5-10 on 2 cores, README).
test: setup
	$(PYTHON) -m pytest -q -n 2 --dist loadfile --durations=15

test-fast: setup
	$(PYTHON) -m pytest -q -m "not integration"

test-integration: setup
	$(PYTHON) -m pytest -q -m integration
