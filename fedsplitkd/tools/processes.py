"""The processes a launcher starts, and everything they start in turn, stopped together; free ports.

``eval "$(python -m fedsplitkd.tools.processes)"`` gives a shell's ``flwr run`` free local ports.

Flower's processes do not stay in one tree: the SuperLink's SuperExec starts its own session,
and once a ``flwr-simulation`` ends its Ray agents are orphans (parent 1) that no tree walk
finds. So a ``ProcessTree`` tags its environment (``FEDSPLITKD_PROCESS_TREE=<id>``), which
every process inherits, Ray's included, and stops whatever carries the tag or descends from its
roots: SIGTERM first, SIGKILL after a grace period. PIDs are matched with their start times,
so a PID the kernel reused for someone else's process is never signalled. Linux (/proc) only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
import uuid
from pathlib import Path

TAG = "FEDSPLITKD_PROCESS_TREE"
# Where `flwr run` with the local SuperLink looks for it (flwr/cli/constant.py): fixed
# defaults 39091 and 39093, whatever FLWR_HOME says, so two local runs would share one.
LOCAL_SUPERLINK_PORT_VARIABLES = ("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT")


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 now (all held open until all are picked)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def free_port() -> int:
    return free_ports(1)[0]


def local_superlink_env() -> dict[str, str]:
    """Free ports for the SuperLink that ``flwr run`` starts on its own, so runs side by side
    each get their own instead of submitting to whichever answers on the default port."""
    return dict(zip(LOCAL_SUPERLINK_PORT_VARIABLES, map(str, free_ports(len(LOCAL_SUPERLINK_PORT_VARIABLES)))))


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first), or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot): with the PID, names one process for good."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def descendants(*roots: int) -> list[int]:
    """Every process below ``roots`` now (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for pid in _pids():
        fields = _stat(pid)
        if fields:
            children.setdefault(int(fields[1]), []).append(pid)
    found, stack = [], list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def tagged(tree_id: str) -> list[int]:
    """Processes whose environment carries ``TAG=tree_id`` (inherited from a process we started)."""
    marker = f"{TAG}={tree_id}".encode()
    found = []
    for pid in _pids():
        try:
            environment = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue  # gone, or not ours to read
        if marker in environment.split(b"\0"):
            found.append(pid)
    return found


class ProcessTree:
    """What a launcher started: ``env`` for its processes, then ``stop`` ends all of them and theirs."""

    def __init__(self) -> None:
        self.id = uuid.uuid4().hex
        self.roots: dict[int, int] = {}  # pid -> start time of the processes we started
        self.seen: dict[int, int] = {}  # pid -> start time, for every member ever observed

    def add_root(self, pid: int) -> None:
        """A process we started (its children are members even where they drop the tag)."""
        started = start_time(pid)
        if started is not None:
            self.roots[pid] = self.seen[pid] = started

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return {**base, TAG: self.id}

    def members(self) -> list[int]:
        """The tree's live processes now (remembered, so a later orphan is still known)."""
        roots = [pid for pid, started in self.roots.items() if start_time(pid) == started]  # not a reused PID
        for pid in {*roots, *descendants(*roots), *tagged(self.id)} - {os.getpid()}:
            started = start_time(pid)
            if started is not None:
                self.seen.setdefault(pid, started)
        return [pid for pid, started in self.seen.items() if start_time(pid) == started and alive(pid)]

    def send(self, signum: int) -> None:
        for pid in self.members():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)

    def stop(self, grace: float = 10.0) -> list[int]:
        """SIGTERM every member, SIGKILL those left after ``grace`` seconds; returns the PIDs
        that needed SIGKILL."""
        self.send(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.members():
            time.sleep(0.1)
        stubborn = self.members()
        self.send(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and self.members():
            time.sleep(0.05)
        return stubborn


def main() -> int:
    """``eval "$(python -m fedsplitkd.tools.processes)"``: this shell's ``flwr run`` gets a local
    SuperLink of its own, on free ports, instead of one another run started."""
    for name, port in local_superlink_env().items():
        print(f"export {name}={port}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
