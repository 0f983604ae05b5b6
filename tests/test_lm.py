"""The GPT language-model case: split logits, KD over sequences, role data, LM runs."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHAKESPEARE, needs_shared
from fedsplitkd.data import sources
from fedsplitkd.config import ConfigError, resolve
from fedsplitkd.data.datasets import _load, device_data, load_dataset
from fedsplitkd.run.experiment import run_inprocess
from fedsplitkd.models.gpt import GPTSize, gpt, train_flops_per_token
from fedsplitkd.protocol.kd import kd_loss
from fedsplitkd.tools.localsim import LocalSimulation
from fedsplitkd.models.zoo import build_student, build_teacher, student_for
from fedsplitkd.protocol.runtime import DeviceRuntime, EdgeRuntime, evaluate

ROOT = Path(__file__).resolve().parents[1]
VOCAB, T = 11, 12


@pytest.fixture(autouse=True)
def fresh_loads():
    _load.cache_clear()
    yield
    _load.cache_clear()


def play(path: Path, roles: int = 60, lines: int = 24, minor: int = 6) -> Path:
    """A synthetic play: ``roles`` speakers of ``lines`` patterned lines each, then ``minor``
    speakers of 2 lines (to be pooled). Each role repeats a phrase of its own, so it is learnable."""
    rng = np.random.default_rng(0)
    words = ["to be", "or not", "the king", "my lord", "sweet", "anon"]
    speeches = []
    for r in range(roles + minor):
        n = lines if r < roles else 2
        phrase = " ".join(rng.choice(words, 3))
        body = "\n".join(f"{phrase}, {words[i % len(words)]}." for i in range(n))
        speeches.append(f"ROLE{r:03d}:\n{body}")
    path.write_text("\n\n".join(speeches) + "\n")
    return path


# ---- the model ----------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["2x32x4", "3x48x6"])
def test_split_at_every_cut_gives_the_unsplit_logits(size):
    torch.manual_seed(0)
    model = gpt(VOCAB, T, GPTSize.parse(size)).eval()
    x = torch.randint(0, VOCAB, (4, T))
    with torch.no_grad():
        whole = model(x)
        assert whole.shape == (4, T, VOCAB)
        assert model.cut_points == ["embed"] + [f"block{i + 1}" for i in range(GPTSize.parse(size).layers)]
        for cut in model.cut_points:
            split = model.server_part(cut)(model.device_part(cut)(x))
            torch.testing.assert_close(split, whole, atol=0, rtol=0)
    assert model.block_stats()[0].out_shape == (T, GPTSize.parse(size).width)


def test_the_transformer_is_causal():
    torch.manual_seed(0)
    model = gpt(VOCAB, T, GPTSize(2, 32, 4)).eval()
    x = torch.randint(0, VOCAB, (2, T))
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % VOCAB  # change the future only
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :7], model(y)[:, :7])
        assert not torch.allclose(model(x)[:, 7:], model(y)[:, 7:])


def test_default_sizes_and_bad_sizes():
    student, teacher = build_student("gpt", (T,), VOCAB), build_teacher("gpt", (T,), VOCAB)
    assert len(student.cut_points) == 3 and len(teacher.cut_points) == 7  # 2x128 vs 6x256
    assert sum(p.numel() for p in teacher.parameters()) > 10 * sum(p.numel() for p in student.parameters())
    assert train_flops_per_token(student, T) > 6 * 2 * 12 * 128 ** 2
    with pytest.raises(ConfigError, match="'gpt-student' = '2x130x4'"):
        resolve({"gpt-student": "2x130x4"})  # 4 heads do not divide 130
    with pytest.raises(ConfigError, match="'gpt-teacher'"):
        resolve({"gpt-teacher": "six"})


@pytest.mark.parametrize("cut", ["embed", "block1"])
def test_split_training_step_equals_unsplit_on_sequences(cut):
    """One device step + one server step (KD over every token) == one unsplit step."""
    torch.manual_seed(0)
    student, teacher = build_student("gpt", (T,), VOCAB, gpt_size="2x32x4"), \
        build_teacher("gpt", (T,), VOCAB, gpt_size="3x48x6")
    reference = copy.deepcopy(student)
    device = DeviceRuntime(student, cut, 0.1, 0.9, teacher.device_part("embed"))
    edge = EdgeRuntime(student, cut, teacher, 0.5, 2.0, 0.1, 0.9)
    rng = np.random.default_rng(1)
    x = rng.integers(0, VOCAB, (5, T)).astype(np.int64)
    y = rng.integers(0, VOCAB, (5, T)).astype(np.int64)
    acts = device.forward(x)
    logits = edge.teacher_logits(device.teacher_input(x))
    grads, loss_sum = edge.train_step([acts], [y], [logits])
    device.backward([x], grads)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    with torch.no_grad():
        target = teacher(torch.from_numpy(x))
    torch.testing.assert_close(torch.from_numpy(logits), target, atol=1e-6, rtol=0)
    loss = kd_loss(reference(torch.from_numpy(x)), target, torch.from_numpy(y), 0.5, 2.0)
    assert loss_sum == pytest.approx(5 * float(loss.detach()), rel=1e-5)  # per-sample = mean over tokens
    loss.backward()
    optimizer.step()
    for (k, a), b in zip(student.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)


# ---- KD over sequences ----------------------------------------------------------------------
def test_kd_loss_over_sequences_matches_a_hand_computation():
    torch.manual_seed(0)
    b, t, v, alpha, temp = 2, 3, 4, 0.3, 2.5
    s, te = torch.randn(b, t, v, dtype=torch.float64), torch.randn(b, t, v, dtype=torch.float64)
    y = torch.randint(0, v, (b, t))
    want = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        for j in range(t):
            ps = [math.exp(s[i, j, k] / temp) for k in range(v)]
            pt = [math.exp(te[i, j, k] / temp) for k in range(v)]
            ps, pt = [p / sum(ps) for p in ps], [p / sum(pt) for p in pt]
            kl = sum(pt[k] * math.log(pt[k] / ps[k]) for k in range(v))
            ce = -math.log(math.exp(s[i, j, y[i, j]]) / sum(math.exp(s[i, j, k]) for k in range(v)))
            want[i, j] = alpha * temp ** 2 * kl + (1 - alpha) * ce
    got = kd_loss(s, te, y, alpha, temp, reduction="none")
    assert got.shape == (b, t)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert float(kd_loss(s, te, y, alpha, temp)) == pytest.approx(float(want.mean()), rel=1e-12)
    with pytest.raises(ValueError, match="do not fit labels"):
        kd_loss(s, te, y[:, :2], alpha, temp)


def test_evaluate_is_per_token():
    model = gpt(VOCAB, T, GPTSize(1, 16, 2))
    x = np.random.default_rng(0).integers(0, VOCAB, (3, T)).astype(np.int64)
    _, loss = evaluate(model, x, x)
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), torch.from_numpy(x).reshape(-1))
    assert loss == pytest.approx(float(want), rel=1e-6)


# ---- data -----------------------------------------------------------------------------------
def test_lm_windows_pool_minor_roles_and_shift_by_one(tmp_path):
    path = play(tmp_path / "play.txt", roles=3, lines=24, minor=2)
    raw = sources.shakespeare(str(path), seq_len=8, stride=5, test_fraction=0.2, sequence=True)
    tokenizer = sources.CharTokenizer(raw["vocab"])
    text = "\n\n".join(speech for _, speech in sources.speeches(path.read_text()))  # speakers' names dropped
    assert raw["x_train"].shape == raw["y_train"].shape and raw["x_train"].shape[1] == 8
    for x, y in zip(raw["x_train"], raw["y_train"]):
        assert tokenizer.decode(x)[1:] == tokenizer.decode(y)[:-1]
        assert tokenizer.decode(x) + tokenizer.decode(y)[-1:] in text
    assert len(set(raw["ids_train"])) == 4  # 3 roles + the pooled minor roles
    assert tokenizer.decode(tokenizer.encode("my lord")) == "my lord"
    with pytest.raises(sources.DataError, match="not in the vocabulary"):
        tokenizer.encode("~")


def test_fifty_role_devices_get_text(tmp_path):
    cfg = resolve({"dataset": "shakespeare-lm", "data-path": str(play(tmp_path / "play.txt")),
                   "seq-len": T, "text-stride": T, "partition": "natural"})
    ds = load_dataset(cfg)
    assert ds.sequence and ds.tokens and ds.vocab and student_for(cfg, ds).block_names[0] == "embed"
    sizes = [len(device_data(cfg, i, 50).y_train) for i in range(50)]
    assert min(sizes) > 0 and device_data(cfg, 0, 50).y_train.shape[1:] == (T,)
    with pytest.raises(ValueError, match="'student-model' = 'mlp'"):
        student_for(resolve({**cfg, "student-model": "mlp"}), ds)


@needs_shared
def test_tiny_shakespeare_has_enough_roles_for_fifty_devices():
    ds = load_dataset(resolve({"dataset": "shakespeare-lm", "data-path": str(SHAKESPEARE), "seq-len": 64,
                               "text-stride": 64}))
    assert ds.num_classes == 65 and len(np.unique(ds.ids_train)) >= 150  # 163 roles of >= 20 lines + 1 pool


# ---- runs -----------------------------------------------------------------------------------
def lm_run(path: Path, **extra) -> dict:
    return {"dataset": "shakespeare-lm", "data-path": str(path), "seq-len": T, "text-stride": 6,
            "partition": "natural", "gpt-student": "1x32x4", "gpt-teacher": "2x48x4", "teacher-epochs": 4,
            "learning-rate": 0.1, "batch-size": 16, "num-rounds": 2, **extra}


@pytest.mark.parametrize("method", ["splitkd", "splitfed"])
def test_lm_rounds_in_process_lower_the_held_out_loss(tmp_path, method):
    _, rows = run_inprocess(lm_run(play(tmp_path / "play.txt"), method=method), 4)
    assert rows[2]["test_loss"] < rows[1]["test_loss"] < rows[0]["test_loss"]
    assert rows[-1]["test_bpc"] == pytest.approx(rows[-1]["test_loss"] / math.log(2))
    assert all(r["dropped_invalid"] + r["dropped_failed"] == 0 for r in rows[1:])


@pytest.mark.integration
def test_two_round_flower_lm_run_lowers_validation_loss(tmp_path):
    out = tmp_path / "out"
    with LocalSimulation() as sim:
        result = sim.run(ROOT, lm_run(play(tmp_path / "play.txt"), **{
            "output-dir": str(out), "run-name": "lm", "fraction-evaluate": 1.0, "text-stride": 24,
            "exchange-batches": 16}), num_supernodes=3)
    assert (out / "lm" / "metrics.csv").is_file(), result.stdout[-3000:] + result.stderr[-2000:]
    with open(out / "lm" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert float(rows[2]["val_loss"]) < float(rows[1]["val_loss"])
    assert float(rows[2]["val_bpc"]) == pytest.approx(float(rows[2]["val_loss"]) / math.log(2))
    assert float(rows[2]["test_loss"]) < float(rows[0]["test_loss"])
    tokenizer = json.loads((out / "lm" / "tokenizer.json").read_text())
    assert tokenizer["kind"] == "char" and "R" in tokenizer["vocab"]
