"""Run the app through Flower's simulation on a private SuperLink, then stop it.

``flwr run .`` starts a detached SuperLink on a fixed port (39091, whatever FLWR_HOME says)
that outlives the run, so two such runs on one machine cross. Tests, benchmarks and sweeps
instead start their own on a free port, point a named connection in a private FLWR_HOME at
it (and give ``flwr``'s own local SuperLink free ports too, should anything ask for it), and
on exit stop every process the SuperLink started: SuperExec, ServerApp, simulation, Ray
(``fedsplitkd.tools.processes``).

    with LocalSimulation() as sim:
        sim.run(".", {"num-rounds": 3}, num_supernodes=5)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fedsplitkd.tools.processes import ProcessTree, descendants, free_port, local_superlink_env

__all__ = ["LocalSimulation", "descendants", "tree_rss_bytes"]

CONNECTION = "fedsplitkd-sim"


def _free_port() -> int:  # kept for callers of the old name
    return free_port()


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants, summed (Linux /proc)."""
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value.replace("'", "") + "'"
    return repr(value)


class LocalSimulation:
    """A private simulation SuperLink for the duration of a ``with`` block."""

    def __init__(self, flwr_home: str | Path | None = None, startup_timeout: float = 60.0):
        self._tmp = None if flwr_home else tempfile.mkdtemp(prefix="fedsplitkd-flwr-")
        self.home = Path(flwr_home or self._tmp)
        self.port = free_port()
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.tree = ProcessTree()  # everything started under this simulation, to stop on exit
        # RAY_ADDRESS 'local': each run starts its own Ray. Without an address, ray.init() joins
        # any cluster that `ray start` recorded on this machine (/tmp/ray/ray_current_cluster), so
        # runs would land on someone else's cluster and die with it. A RAY_ADDRESS set here stays.
        self.env = self.tree.env({**os.environ, "RAY_ADDRESS": os.environ.get("RAY_ADDRESS") or "local",
                                  "FLWR_HOME": str(self.home),
                                  "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                                  "FLWR_DISABLE_UPDATE_CHECK": "1", **local_superlink_env()})

    def __enter__(self) -> LocalSimulation:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        log = open(self.home / "superlink.log", "w")
        self.process = subprocess.Popen(
            ["flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1",
             "--port", str(self.port)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.tree.add_root(self.process.pid)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with {self.process.returncode}; "
                                   f"see {self.home / 'superlink.log'}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=0.5)
                return self
            except OSError:
                time.sleep(0.2)
        self.__exit__(None, None, None)
        raise RuntimeError(f"flower-superlink did not answer on port {self.port} in "
                           f"{self.startup_timeout:.0f} s")

    def _command(self, app: str | Path, run_config: dict | None, num_supernodes: int,
                 cpus_per_client: int) -> list[str]:
        overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in (run_config or {}).items())
        command = ["flwr", "run", str(app), CONNECTION, "--stream", "--federation-config",
                   f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"]
        return command + (["--run-config", overrides] if overrides else [])

    def run(self, app: str | Path, run_config: dict | None = None, num_supernodes: int = 2,
            cpus_per_client: int = 2, timeout: float = 1800.0) -> subprocess.CompletedProcess:
        """``flwr run APP --stream`` with the given run config; returns when the run ends.

        The exit status says little (``flwr run --stream`` exits 0 on failure): judge a
        run by the results it wrote.
        """
        return subprocess.run(self._command(app, run_config, num_supernodes, cpus_per_client),
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def run_many(self, app: str | Path, runs: list[tuple[dict, int]], cpus_per_client: int = 2,
                 parallel: int = 2, timeout: float = 1800.0) -> list[subprocess.CompletedProcess]:
        """``run`` for each (run config, node count) of ``runs``, ``parallel`` of them at a time
        on this SuperLink (its SuperExec launches each run's simulation as its own process).
        A run spends most of its wall time starting Ray and waiting on the engine's message
        polls, so runs side by side finish sooner than one after another, with the same results."""
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = [pool.submit(self.run, app, config, nodes, cpus_per_client, timeout) for config, nodes in runs]
            return [future.result() for future in futures]

    def start(self, app: str | Path, run_config: dict | None = None, num_supernodes: int = 2,
              cpus_per_client: int = 2) -> subprocess.Popen:
        """Start a run and return at once (the CLI process streams its log to DEVNULL)."""
        return subprocess.Popen(self._command(app, run_config, num_supernodes, cpus_per_client),
                                env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self) -> None:
        """SIGKILL the SuperLink and everything it started (the ServerApp, the simulation)."""
        self.tree.send(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=10)

    def __exit__(self, *exc) -> None:
        """Stop the whole tree: SIGTERM, then SIGKILL whatever is left after 10 s."""
        self.tree.stop(grace=10.0)
        if self.process is not None:
            self.process.wait(timeout=10)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
