"""Checkpoints and resume (in-process): a resumed run repeats the uninterrupted one."""

import csv
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fedsplitkd.run import checkpoint
from fedsplitkd.config import ConfigError
from fedsplitkd.run.experiment import run_inprocess
from fedsplitkd.tools.localsim import LocalSimulation

from conftest import tiny, warm_teachers

ROOT = Path(__file__).resolve().parents[1]
DEVICES = 4
# Adaptive cuts per cluster, so the checkpoint must carry clusters, cuts and several optimizers.
RUN = tiny(num_rounds=4, clusters="2", cut="adaptive", fraction_train=0.75, exchange_batches=2,
           teacher_input="embedding")  # what a run with checkpoints uses (teacher-input auto)
# A resumed run re-sends the teacher's embedding (devices keep nothing across runs), so its
# bytes down and virtual clock run ahead; everything learned is the same.
LEARNED = ("test_accuracy", "test_loss", "train_loss", "bytes_up", "bytes_up_activations", "devices",
           "completed")
WALL_CLOCK = ("wall_s", "transport_s", "server_s")


def same_rows(a: list[dict], b: list[dict], keys) -> None:
    assert [r["round"] for r in a] == [r["round"] for r in b]
    for x, y in zip(a, b):
        assert {k: repr(x[k]) for k in keys} == {k: repr(y[k]) for k in keys}, x["round"]  # NaN == NaN


@pytest.fixture(scope="module")
def uninterrupted():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests run: float sums depend on the thread count
    yield run_inprocess(RUN, DEVICES)
    torch.set_num_threads(threads)


def test_resumed_run_ends_like_the_uninterrupted_one(uninterrupted, tmp_path):
    exp_full, full = uninterrupted
    _, first = run_inprocess({**RUN, "num-rounds": 2, "checkpoint-every": 1}, DEVICES, checkpoint_dir=tmp_path)
    assert checkpoint.load(tmp_path)["round"] == 2
    exp, resumed = run_inprocess({**RUN, "resume": str(tmp_path)}, DEVICES)
    same_rows(resumed, full, LEARNED)
    assert resumed[3]["bytes_down"] > full[3]["bytes_down"] and resumed[4]["bytes_down"] == full[4]["bytes_down"]
    assert repr(resumed[:3]) == repr(first)  # the checkpoint's rows come back as they were
    for (name, a), b in zip(exp.student.state_dict().items(), exp_full.student.state_dict().values()):
        assert torch.equal(a, b), name
    assert exp.scheduler.history == exp_full.scheduler.history


def test_same_seed_same_rows(uninterrupted):
    _, again = run_inprocess(RUN, DEVICES)
    same_rows(again, uninterrupted[1], [k for k in again[0] if k not in WALL_CLOCK])


def test_resume_refuses_a_changed_config_or_a_missing_checkpoint(tmp_path):
    run_inprocess({**RUN, "num-rounds": 1, "checkpoint-every": 1}, DEVICES, checkpoint_dir=tmp_path)
    with pytest.raises(ConfigError, match="'learning-rate'"):
        run_inprocess({**RUN, "learning-rate": 0.5, "resume": str(tmp_path)}, DEVICES)
    with pytest.raises(ConfigError, match="'num-rounds' = 1"):
        run_inprocess({**RUN, "num-rounds": 1, "resume": str(tmp_path)}, DEVICES)
    cosine = {**RUN, "num-rounds": 3, "lr-schedule": "cosine"}
    (tmp_path / "cosine").mkdir()
    run_inprocess({**cosine, "checkpoint-every": 1}, DEVICES, checkpoint_dir=tmp_path / "cosine")
    with pytest.raises(ConfigError, match="'num-rounds' = 4: lr-schedule 'cosine'"):
        run_inprocess({**cosine, "num-rounds": 4, "resume": str(tmp_path / "cosine")}, DEVICES)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint.pt"):
        run_inprocess({**RUN, "resume": str(tmp_path / "elsewhere")}, DEVICES)
    (tmp_path / "checkpoint.pt").write_bytes(b"truncated")
    with pytest.raises(checkpoint.CheckpointError, match="cannot read"):
        run_inprocess({**RUN, "resume": str(tmp_path)}, DEVICES)


@pytest.mark.integration
def test_flower_run_killed_mid_way_resumes_to_the_uninterrupted_end(tmp_path, shared_teachers):
    """SIGKILL the whole Flower run after a checkpoint; `resume` ends where an unbroken run ends.
    Two unbroken runs of one config also write byte-identical metrics.csv files."""
    common = {**tiny(num_rounds=10, teacher_epochs=5), "output-dir": str(tmp_path),
              "teacher-cache-dir": str(shared_teachers), "checkpoint-every": 2}
    warm_teachers([common])
    killed = tmp_path / "killed"
    # The run to kill has a SuperLink of its own (the kill takes its whole tree); the unbroken
    # run goes on beside it, then the second unbroken run beside the resumed one.
    with LocalSimulation() as sim, LocalSimulation() as doomed, ThreadPoolExecutor(1) as pool:
        unbroken = pool.submit(sim.run, ROOT, {**common, "run-name": "whole"}, 3)
        doomed.start(ROOT, {**common, "run-name": "killed"}, num_supernodes=3)
        deadline = time.monotonic() + 300
        while not ((killed / "checkpoint.pt").is_file() and checkpoint.load(killed)["round"] >= 4):
            assert time.monotonic() < deadline, "no checkpoint of round 4 within 300 s"
            time.sleep(0.05)
        doomed.kill()
        assert not (killed / "summary.json").exists(), "the run ended before the kill: nothing was tested"
        at_kill = checkpoint.load(killed)["round"]
        assert at_kill < 10
        unbroken.result()
        sim.run_many(ROOT, [({**common, "run-name": "again"}, 3),
                            ({**common, "run-name": "unused", "resume": str(killed)}, 3)])
    whole = (tmp_path / "whole" / "metrics.csv").read_text()
    assert whole.count("\n") == 12, "the unbroken run did not finish"  # header + rounds 0..10
    assert (tmp_path / "again" / "metrics.csv").read_text() == whole

    ours = list(csv.DictReader(open(killed / "metrics.csv")))
    theirs = list(csv.DictReader(open(tmp_path / "whole" / "metrics.csv")))
    same_rows(ours, theirs, LEARNED)
    for (name, a), b in zip(torch.load(killed / "student.pt").items(), torch.load(tmp_path / "whole" / "student.pt").values()):
        assert torch.equal(a, b), name
