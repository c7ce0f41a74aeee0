"""Encodings with random tables, shared by the attention tests of every path."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import irpe


def random_encodings(
    config_args: dict[str, Any],
    head_dim: int,
    num_heads: int,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    values_args: dict[str, Any] | None = None,
    seed: int = 0,
) -> list[irpe.iRPE | irpe.iRPE_Cross | None]:
    """The q, k, v encodings of ``config_args`` in ``dtype`` on ``device``, tables drawn from N(0, 1) (zero tables,
    as built, would hide a wrong bucket). ``values_args`` (a config with ``rpe_on='v'``) replaces the encoding on
    values, e.g. a contextual one beside bias encodings on queries and keys (bias has no values mode)."""
    torch.manual_seed(seed)
    modules = irpe.build_rpe(irpe.get_rpe_config(**config_args), head_dim, num_heads)
    if values_args is not None:
        modules[2] = irpe.build_rpe(irpe.get_rpe_config(**values_args), head_dim, num_heads)[2]
    for module in modules:
        if module is not None:
            module.to(device=device, dtype=dtype)
            for p in module.parameters():
                nn.init.normal_(p)
    return modules
