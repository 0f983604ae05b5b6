"""The Hugging Face splitter on tiny random GPT-2 and Llama checkpoints built here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsplitkd.config import resolve
from fedsplitkd.models.hf import load_split
from fedsplitkd.models.zoo import student_for, teacher_for
from fedsplitkd.protocol.runtime import DeviceRuntime, EdgeRuntime

transformers = pytest.importorskip("transformers")

VOCAB, CONTEXT = 65, 16


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                         bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def checkpoint(request, tmp_path_factory):
    model = tiny(request.param).eval()
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path


def test_split_at_every_cut_gives_the_hf_logits(checkpoint):
    kind, model, path = checkpoint
    split = load_split(str(path), CONTEXT).eval()
    assert split.block_names == ["embed", "layer1", "layer2", "head"]
    x = torch.randint(0, VOCAB, (3, CONTEXT))
    with torch.no_grad():
        want = model(x).logits
        for cut in split.cut_points:
            got = split.server_part(cut)(split.device_part(cut)(x))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"{kind} cut {cut}")
    # only hidden states cross the cut; the whole model's weights are all in the parts
    assert split.block_stats()[1].out_shape == (CONTEXT, 32)
    n_hf = sum(p.numel() for p in model.parameters())
    tied = model.config.tie_word_embeddings
    assert sum(p.numel() for p in split.parameters()) == n_hf + (VOCAB * 32 if tied else 0)


def test_split_hf_model_trains_through_the_runtimes(checkpoint):
    """A device step and a server step on the split HF student move both parts."""
    _, _, path = checkpoint
    student = load_split(str(path), CONTEXT)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    device = DeviceRuntime(student, "layer1", 0.1, 0.0)
    edge = EdgeRuntime(student, "layer1", None, 0.0, 1.0, 0.1, 0.0)
    x = np.random.default_rng(0).integers(0, VOCAB, (4, CONTEXT)).astype(np.int64)
    grads, loss = edge.train_step([device.forward(x)], [x], [None])
    device.backward([x], grads)
    assert np.isfinite(loss)
    for block in ("embed", "layer1", "layer2", "head"):
        assert any(not torch.equal(v, before[k]) for k, v in student.state_dict().items() if k.startswith(block))


def test_run_config_loads_hf_student_and_teacher(checkpoint, tmp_path):
    _, _, path = checkpoint
    dataset = type("LM", (), {"name": "lm", "sequence": True, "tokens": True, "input_shape": (CONTEXT,),
                              "num_classes": VOCAB})()
    cfg = resolve({"dataset": "shakespeare-lm", "hf-student": str(path), "hf-teacher": str(path)})
    assert student_for(cfg, dataset).block_names[1] == "layer1"
    assert teacher_for(cfg, dataset).cut_points[0] == "embed"
    small = type("LM", (), {**dataset.__class__.__dict__, "num_classes": 10})()
    with pytest.raises(ValueError, match="vocabulary of 65 tokens, the dataset has 10"):
        student_for(cfg, small)


def test_hub_names_and_missing_paths_are_refused(tmp_path):
    for path in ("gpt2", "meta-llama/Llama-3.2-1B", str(tmp_path / "absent")):
        with pytest.raises(ValueError, match="not a local checkpoint directory"):
            load_split(path, CONTEXT)
