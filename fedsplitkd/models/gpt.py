"""A GPT-style causal transformer as a ``SplitModel`` (nanoGPT style).

Blocks: ``embed`` (token + learnt position embedding), ``block1``..``blockN`` (pre-LN
causal self-attention + MLP, with residuals) and ``head`` (final LayerNorm + lm_head).
Input: int64 token ids (B, T) with T <= the context; output: logits (B, T, vocab). A cut
after ``embed`` puts only the embedding module on the device, as in the split-KD paper.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedsplitkd.models.splitmodel import SplitModel


@dataclass(frozen=True)
class GPTSize:
    """Layers, width and attention heads, written ``LxWxH`` in the run config (e.g. '2x128x4')."""

    layers: int
    width: int
    heads: int

    @classmethod
    def parse(cls, text: str, key: str = "gpt size") -> GPTSize:
        match = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+)\s*", str(text))
        if not match:
            raise ValueError(f"{key} {text!r}: expected layers x width x heads, e.g. '2x128x4'")
        size = cls(*map(int, match.groups()))
        if min(size.layers, size.width, size.heads) < 1 or size.width % size.heads:
            raise ValueError(f"{key} {text!r}: layers, width, heads must be >= 1 and heads must divide width")
        return size


class Embed(nn.Module):
    """Token plus learnt absolute position embedding."""

    def __init__(self, vocab: int, context: int, width: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        return self.tokens(idx) + self.positions(positions)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(width), CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def _init(module: nn.Module) -> None:
    # GPT-2's initialisation: small normal weights keep early logits near uniform.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def gpt(vocab: int, context: int, size: GPTSize) -> SplitModel:
    """A causal LM over ``vocab`` tokens and windows of ``context`` tokens."""
    blocks: list[tuple[str, nn.Module]] = [("embed", Embed(vocab, context, size.width))]
    blocks += [(f"block{i + 1}", Block(size.width, size.heads)) for i in range(size.layers)]
    blocks.append(("head", nn.Sequential(nn.LayerNorm(size.width), nn.Linear(size.width, vocab, bias=False))))
    model = SplitModel(blocks, (context,), torch.int64)
    model.apply(_init)
    return model


def train_flops_per_token(model: SplitModel, context: int) -> float:
    """Training FLOPs per token (forward + backward), the PaLM appendix-B count:
    6 x (non-embedding parameters) + 12 x layers x width x context (attention scores)."""
    params = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embed."))
    blocks = [m for m in model if isinstance(m, Block)]
    width = blocks[0].ln1.normalized_shape[0] if blocks else 0
    return 6.0 * params + 12.0 * len(blocks) * width * context
