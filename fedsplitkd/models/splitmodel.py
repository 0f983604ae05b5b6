"""A network as an ordered list of named blocks, cut after any block (``SplitModel``).

A cut named ``b`` puts every block up to and including ``b`` on the device and the rest
on the edge server. Parts share their modules with the whole model, and their
state_dict keys are the whole model's keys, so merging parts is a dict union.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class BlockStats:
    """Per-sample figures of one block, for the cost model and the adaptive cut."""

    name: str
    params: int
    out_shape: tuple[int, ...]
    activation_numel: int
    forward_flops: int


class Part(nn.Sequential):
    """The blocks of a ``SplitModel`` on one side of a cut, under the model's own block names
    (so a part's state dict loads into the model's, and the model's into the part's)."""


class SplitModel(nn.Sequential):
    """A sequential model whose blocks are named candidate cut points.

    The last block (the classifier head) is never a cut point: the server needs at
    least one block to compute the loss.
    """

    def __init__(self, blocks: list[tuple[str, nn.Module]], input_shape: tuple[int, ...],
                 input_dtype: torch.dtype = torch.float32):
        super().__init__(OrderedDict(blocks))
        self.input_shape = tuple(input_shape)
        self.input_dtype = input_dtype

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, *self.input_shape, dtype=self.input_dtype)

    @property
    def block_names(self) -> list[str]:
        return list(self._modules)

    @property
    def cut_points(self) -> list[str]:
        return self.block_names[:-1]

    def cut_index(self, cut: str) -> int:
        if cut == "default":
            return 1
        if cut not in self.cut_points:
            raise ValueError(f"cut '{cut}' is not a cut point of this model: {self.cut_points}")
        return self.block_names.index(cut) + 1

    def device_part(self, cut: str) -> Part:
        return Part(OrderedDict(list(self._modules.items())[: self.cut_index(cut)]))

    def server_part(self, cut: str) -> Part:
        return Part(OrderedDict(list(self._modules.items())[self.cut_index(cut):]))

    def block_stats(self) -> list[BlockStats]:
        """Parameters, output size and forward FLOPs per sample of every block."""
        stats = []
        param = next(self.parameters(), None)
        x = self.example_input().to(param.device if param is not None else "cpu")
        with torch.no_grad():
            for name, block in self._modules.items():
                counter = FlopCounterMode(display=False)
                with counter:
                    x = block(x)
                stats.append(BlockStats(
                    name=name,
                    params=sum(p.numel() for p in block.parameters()),
                    out_shape=tuple(x.shape[1:]),
                    activation_numel=x[0].numel(),
                    forward_flops=counter.get_total_flops(),
                ))
        return stats
