"""Local runs that never cross, and launchers that leave nothing behind (issue 35).
Two simulations at once, each with its own results: tests/test_baselines.py runs its methods so.

Each launcher's SuperLink, and the local SuperLink ``flwr run`` would start on its own, get
free ports; stopping a launcher ends every process started under it, even those that left its
process tree (a new session, an orphan) or ignore SIGTERM."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path


from fedsplitkd.tools.deployment import LocalDeployment
from fedsplitkd.tools.localsim import LocalSimulation
from fedsplitkd.tools.processes import (LOCAL_SUPERLINK_PORT_VARIABLES, TAG, ProcessTree, alive, descendants,
                                        free_ports, tagged)

ROOT = Path(__file__).resolve().parents[1]

# A parent that starts: a child in its own session, a grandchild it orphans (its parent exits),
# and a child that ignores SIGTERM. Each writes its PID to the directory given.
SPAWNER = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    out = sys.argv[1]
    sleeper = [sys.executable, "-c", "import time; time.sleep(300)"]
    stubborn = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                      "open(%r, 'w').write('ready'); time.sleep(300)" % (out + '/stubborn.ready')]
    subprocess.Popen(sleeper, start_new_session=True)
    middle = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; "
                               "subprocess.Popen(%r, start_new_session=True)" % (sleeper,)])
    middle.wait()  # its child is an orphan now
    subprocess.Popen(stubborn)
    open(out + "/parent.ready", "w").write("ready")
    time.sleep(300)
""")


def wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_free_ports_differ_and_each_launcher_gets_its_own():
    ports = free_ports(8)
    assert len(set(ports)) == 8 and all(1024 < p < 65536 for p in ports)
    first, second = LocalSimulation(), LocalSimulation()
    deployment = LocalDeployment(2)
    try:
        local_ports = [tuple(launcher.env[v] for v in LOCAL_SUPERLINK_PORT_VARIABLES)
                       for launcher in (first, second, deployment)]
        assert len(set(local_ports)) == 3 and all(len(set(p)) == 2 for p in local_ports)
        assert "39091" not in {p for pair in local_ports for p in pair}
        assert len({first.port, second.port, deployment.port}) == 3
        assert len({first.env[TAG], second.env[TAG], deployment.env[TAG]}) == 3
        # SuperNodes each on their own port too
        node_ports = {deployment.supernode_command(i)[deployment.supernode_command(i).index("--port") + 1]
                      for i in range(2)}
        assert len(node_ports) == 2
    finally:
        for launcher in (first, second):
            launcher.__exit__(None, None, None)  # never entered: only its temporary home to remove
        deployment.__exit__(None, None, None)


def test_a_process_tree_stops_with_its_escapees_and_leaves_others_alone(tmp_path):
    tree = ProcessTree()
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])  # not ours
    parent = subprocess.Popen([sys.executable, "-c", SPAWNER, str(tmp_path)], env=tree.env({}) | _path_env())
    tree.add_root(parent.pid)
    try:
        wait_for(tmp_path / "parent.ready")
        wait_for(tmp_path / "stubborn.ready")
        members = tree.members()
        below = descendants(parent.pid)
        # the parent, two sleepers (one in a session of its own, one orphaned when the middle
        # process exited: no longer below the parent) and the stubborn one
        assert len(members) == 4 and len(below) == 2, (members, below)
        assert set(tagged(tree.id)) == set(members)
        stubborn = tree.stop(grace=1.0)
        parent.wait(timeout=10)
        assert len(stubborn) == 1  # the one that ignored SIGTERM needed SIGKILL
        assert not [pid for pid in members if alive(pid)] and not tagged(tree.id)
        assert alive(bystander.pid)
    finally:
        bystander.kill()
        bystander.wait()
        tree.stop(grace=0.5)


def _path_env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "PYTHONPATH", "LANG")}


def test_the_shell_helper_exports_free_local_superlink_ports(capsys):
    from fedsplitkd.tools.processes import main

    assert main() == 0
    lines = capsys.readouterr().out.splitlines()
    exported = dict(line.removeprefix("export ").split("=") for line in lines)
    assert set(exported) == set(LOCAL_SUPERLINK_PORT_VARIABLES)
    assert len(set(exported.values())) == 2 and "39091" not in exported.values()


def test_simulation_runs_start_their_own_ray_even_beside_a_recorded_cluster(tmp_path, monkeypatch):
    """ray.init() with no address joins the cluster `ray start` recorded on the machine; a
    LocalSimulation's runs must not (they would share its CPUs and die with it). Ray's own
    address resolution, under each environment, with such a record in its temp dir."""
    from ray._private.services import canonicalize_bootstrap_address

    (tmp_path / "ray_current_cluster").write_text("127.0.0.1:6379")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert canonicalize_bootstrap_address(None, str(tmp_path)).endswith(":6379")  # the hazard: joined
    sim = LocalSimulation()
    try:
        monkeypatch.setenv("RAY_ADDRESS", sim.env["RAY_ADDRESS"])
        assert canonicalize_bootstrap_address(None, str(tmp_path)) is None  # a Ray of its own
    finally:
        sim.__exit__(None, None, None)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")  # a cluster named on purpose is kept
    chosen = LocalSimulation()
    try:
        assert chosen.env["RAY_ADDRESS"] == "10.0.0.7:6379"
    finally:
        chosen.__exit__(None, None, None)
