"""Where a ClientApp process's time goes (read by ``experiments/bench_deployment.py``).

A real SuperNode starts a fresh ``flwr-clientapp`` process for every message. With
``FEDSPLITKD_TIMING=DIR`` in the SuperNode's environment (its ClientApp processes inherit
it), every message handled appends one JSON line to ``DIR/<pid>.jsonl``: Unix times of the
process's start, of our app module's import (start and end), and of the handler's start,
its device setup (data and models) and its end. The ServerApp's transport
(``strategies/transport.py``) records, beside them in ``DIR/server/<pid>.jsonl``, when it
pushed each message and when each reply came back (``experiments/bench_limit.py --trace``
sets the two against each other). Unset, nothing is recorded.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

DIRECTORY = os.environ.get("FEDSPLITKD_TIMING", "")
_marks: dict[str, float] = {}


def process_start() -> float | None:
    """This process's start as a Unix time (Linux: /proc), or None."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def mark(name: str) -> None:
    """Note the time of ``name`` (kept only while recording)."""
    if DIRECTORY:
        _marks[name] = time.time()


def timed(handler: Callable) -> Callable:
    """Record a handler's message: its type, the marks so far, its start and end."""
    if not DIRECTORY:
        return handler

    @functools.wraps(handler)
    def wrapper(msg, context):
        start = time.time()
        try:
            return handler(msg, context)
        finally:
            line = {"pid": os.getpid(), "type": msg.metadata.message_type, "node": context.node_id,
                    "process": process_start(), **_marks, "handler": start, "end": time.time()}
            _append(Path(DIRECTORY), line)
    return wrapper


def event(name: str, **fields) -> None:
    """Record a ServerApp event (a push, a reply) with its Unix time, while recording."""
    if DIRECTORY:  # apart from the handlers' lines, which readers glob
        _append(Path(DIRECTORY) / "server", {"event": name, "time": time.time(), **fields})


def _append(directory: Path, line: dict) -> None:
    """One JSON line in this process's file under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{os.getpid()}.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
