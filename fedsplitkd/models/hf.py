"""Hugging Face ``transformers`` causal LMs as ``SplitModel``s (the optional ``hf`` extra).

A checkpoint is loaded from a local directory only (``save_pretrained`` output), never
by hub name, and cut into blocks: ``embed`` (token embedding, plus GPT-2's position
embedding), ``layer1``..``layerN`` (the decoder layers) and ``head`` (final norm +
lm_head). Cutting after ``layerK`` puts the embedding and the first K layers on the
device. Each layer block rebuilds the causal mask (and Llama's rotary embedding, which
has no weights) from its input, so only hidden states (B, T, D) cross the cut. Tied
input/output embeddings are untied: the device holds one copy, the server the other.

Supported: GPT-2 style (``transformer.wte/wpe/h/ln_f``) and Llama style
(``model.embed_tokens/layers/norm/rotary_emb``) models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedsplitkd.models.splitmodel import SplitModel


def _positions(hidden: torch.Tensor) -> torch.Tensor:
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


def _mask(config, hidden: torch.Tensor, positions: torch.Tensor):
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=None,
                              past_key_values=None, position_ids=positions)


class GPT2Embed(nn.Module):
    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.wte, self.wpe, self.drop = transformer.wte, transformer.wpe, transformer.drop

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.drop(self.wte(idx) + self.wpe(_positions(idx)))


class GPT2Layer(nn.Module):
    def __init__(self, block: nn.Module, config):
        super().__init__()
        self.block, self.config = block, config

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = _positions(hidden)
        return self.block(hidden, None, _mask(self.config, hidden, positions), position_ids=positions)


class LlamaLayer(nn.Module):
    def __init__(self, layer: nn.Module, rotary: nn.Module, config):
        super().__init__()
        self.layer, self.config = layer, config
        self._rotary = [rotary]  # shared, weightless: kept out of the module tree and state_dict

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = _positions(hidden)
        rotary = self._rotary[0].to(hidden.device)
        return self.layer(hidden, attention_mask=_mask(self.config, hidden, positions), position_ids=positions,
                          position_embeddings=rotary(hidden, positions))


def _untied_head(norm: nn.Module, lm_head: nn.Linear, embedding: nn.Embedding) -> nn.Sequential:
    if lm_head.weight is embedding.weight:
        lm_head.weight = nn.Parameter(embedding.weight.detach().clone())
    return nn.Sequential(norm, lm_head)


def split_causal_lm(model: nn.Module, context: int) -> SplitModel:
    """Cut a loaded GPT-2- or Llama-style causal LM into a SplitModel over windows of ``context`` tokens."""
    config = model.config
    if hasattr(model, "transformer") and hasattr(model.transformer, "h"):  # GPT-2 style
        body = model.transformer
        blocks = [("embed", GPT2Embed(body))]
        blocks += [(f"layer{i + 1}", GPT2Layer(b, config)) for i, b in enumerate(body.h)]
        blocks.append(("head", _untied_head(body.ln_f, model.lm_head, body.wte)))
    elif hasattr(model, "model") and hasattr(model.model, "layers") and hasattr(model.model, "rotary_emb"):
        body = model.model
        blocks = [("embed", body.embed_tokens)]
        blocks += [(f"layer{i + 1}", LlamaLayer(layer, body.rotary_emb, config)) for i, layer in enumerate(body.layers)]
        blocks.append(("head", _untied_head(body.norm, model.lm_head, body.embed_tokens)))
    else:
        raise ValueError(f"no splitter for {type(model).__name__}: expected a GPT-2 style (transformer.h) "
                         "or Llama style (model.layers) causal LM")
    return SplitModel(blocks, (context,), torch.int64)


def load_split(path: str, context: int, vocab: int | None = None, key: str = "hf checkpoint") -> SplitModel:
    """The causal LM saved in the local directory ``path``, split; ``vocab``, when given, must
    be its vocabulary size (the dataset's token count)."""
    directory = Path(path).expanduser()
    if not (directory.is_dir() and (directory / "config.json").is_file()):
        raise ValueError(f"{key} '{path}': not a local checkpoint directory with a config.json "
                         "(hub names are not fetched at run time)")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as err:
        raise ValueError(f"{key} '{path}' needs the hf extra: pip install 'fedsplitkd[hf]'") from err
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, attn_implementation="sdpa")
    if vocab is not None and model.config.vocab_size != vocab:
        raise ValueError(f"{key} '{path}': vocabulary of {model.config.vocab_size} tokens, the dataset has {vocab}")
    if context > getattr(model.config, "n_positions", getattr(model.config, "max_position_embeddings", context)):
        raise ValueError(f"{key} '{path}': context {context} exceeds the model's maximum positions")
    return split_causal_lm(model.float(), context)
