"""examples/own-model: a Flower app of the user's own (LeNet Net, own teacher, dict DataLoaders) that
no part of the zoo knows, trained by split-KD through ``flwr run`` (select with ``pytest -k example``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedsplitkd.tools.localsim import LocalSimulation

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own-model"
SPLIT_KD_LINES = 30  # the bound on split-KD-specific code in the user's files


def test_example_keeps_split_kd_code_small():
    """Lines of the user's files that name fedsplitkd or its objects (imports and calls)."""
    names = re.compile(r"fedsplitkd|SplitDevice|SplitKDConfig|SplitKD\b|register_device|from_models|config\.")
    lines = [line for f in (EXAMPLE / "own_model").glob("*.py") for line in f.read_text().splitlines()
             if names.search(line) and not line.lstrip().startswith("#")]
    assert 0 < len(lines) <= SPLIT_KD_LINES, lines
    assert "from fedsplitkd" not in (EXAMPLE / "own_model" / "task.py").read_text()  # the model knows nothing


@pytest.mark.integration
def test_example_own_model_app_runs_split_kd_through_flwr_run(tmp_path):
    result = tmp_path / "result.json"
    with LocalSimulation() as sim:
        # a protocol key the app declares, overridden on the command line
        run = sim.run(EXAMPLE, {"result-file": str(result), "teacher-input": "embedding"}, num_supernodes=3, timeout=900)
    assert result.is_file(), run.stdout[-3000:] + run.stderr[-3000:]
    written = json.loads(result.read_text())
    assert written["teacher_input"] == "embedding"
    assert written["teacher_accuracy"] > 0.5  # the teacher, reported by from_models (chance is 0.1)
    rounds = {int(r): m for r, m in written["rounds"].items()}
    first, last = rounds[0]["test_accuracy"], rounds[max(rounds)]["test_accuracy"]
    assert max(rounds) == 5
    assert last >= first + 0.2 and last >= 0.4, rounds  # chance is 0.1: the student learned
