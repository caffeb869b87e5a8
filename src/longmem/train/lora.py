"""LoRA adapters for the SideNet's projections (a parameter-efficient trainable set).

``LoRALinear`` wraps a frozen linear map (``nn.Linear`` or GPT-2's ``Conv1D``) and adds
``scale * B(A(x))`` with B initialised to zero, so wrapping changes nothing at step 0.
``merge_lora`` folds the adapters back into plain weights for export.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _in_out(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear ([out,in] weight) or Conv1D ([in,out] weight)."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    return base.weight.shape[0], base.weight.shape[1]


class LoRALinear(nn.Module):
    """base(x) + scale * x A^T B^T, with the base frozen."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        d_in, d_out = _in_out(base)
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, d_in))  # [r, in]
        self.lora_b = nn.Parameter(torch.zeros(d_out, rank))  # [out, r]
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        delta = (x.to(self.lora_a.dtype) @ self.lora_a.T) @ self.lora_b.T
        return self.base(x) + (self.scale * delta).to(x.dtype)

    def merged(self) -> nn.Module:
        """The base module with the adapter folded into its weight."""
        with torch.no_grad():
            delta = (self.scale * self.lora_b @ self.lora_a).to(self.base.weight.dtype)  # [out, in]
            weight = self.base.weight
            weight += delta if isinstance(self.base, nn.Linear) else delta.T
        return self.base.requires_grad_(True)


def add_lora(module: nn.Module, rank: int, alpha: float) -> list[str]:
    """Wrap every Linear/Conv1D below ``module`` (not the gates or norms); returns their names."""
    targets = [(name, child) for name, child in module.named_modules() if _is_linear(child)]
    for name, child in targets:
        parent, attr = _parent(module, name)
        setattr(parent, attr, LoRALinear(child, rank, alpha))
    return [name for name, _ in targets]


def merge_lora(module: nn.Module) -> None:
    """Replace every LoRALinear below ``module`` by its merged base module, in place."""
    wrapped = [(name, child) for name, child in module.named_modules() if isinstance(child, LoRALinear)]
    for name, child in wrapped:
        parent, attr = _parent(module, name)
        setattr(parent, attr, child.merged())


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (root.get_submodule(path) if path else root), attr
