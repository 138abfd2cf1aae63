"""Reduced-precision inference: a network wrapped to compute under autocast, float32 in and out.

bfloat16 autocast runs convolutions and matrix products in bfloat16 where the hardware has it (CPUs with AVX-512
BF16 or AMX, recent GPUs) and keeps normalisation in float32 (nets/unet.py's GroupNorm32). Outputs differ from
float32 by about 0.3% relative (the aging demo's UNet), so results change slightly: an opt-in speed setting.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}


class Autocast(nn.Module):
    """``network`` run under ``torch.autocast(dtype)`` on its own device; the output is cast back to float32."""

    def __init__(self, network: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.network, self.dtype = network, dtype

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        device = next(self.network.parameters()).device.type
        with torch.autocast(device, dtype=self.dtype):
            return self.network(*args, **kwargs).float()


def with_precision(network: nn.Module, precision: str) -> nn.Module:
    """``network`` itself for "float32", else wrapped in ``Autocast`` (``precision`` checked by the caller)."""
    dtype = PRECISIONS[precision]
    return network if dtype is None else Autocast(network, dtype)
