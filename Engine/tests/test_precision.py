"""Inference speed settings that keep the networks' meaning: channels_last convolutions and bfloat16 autocast."""

from __future__ import annotations

import torch

from diffusion_engine.nets.bundle import channels_last_convolutions
from diffusion_engine.nets.precision import Autocast, with_precision
from diffusion_engine.nets.unet import build_network

UNET = {"image_size": 16, "in_channels": 1, "model_channels": 32, "out_channels": 1, "num_res_blocks": 1,
        "attention_resolutions": [2], "channel_mult": [1, 2]}


def _unet(dims: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    network = build_network("UNetModel", {**UNET, "dims": dims}).eval()
    for parameter in network.parameters():  # zero-initialised output layers would make every output 0
        parameter.data.normal_(0.0, 0.05)
    return network


@torch.no_grad()
def test_channels_last_convolutions_keep_the_outputs() -> None:
    network, x, t = _unet(), torch.randn(3, 1, 16, 16), torch.tensor([0, 400, 999])
    expected = network(x, t)
    channels_last_convolutions(network)
    convolutions = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convolutions)
    torch.testing.assert_close(network(x, t), expected, atol=1e-5, rtol=1e-4)
    volume_network = _unet(dims=3)  # 3D convolutions have no channels_last layout: left alone, still runs
    channels_last_convolutions(volume_network)
    assert volume_network(torch.randn(1, 1, 8, 16, 16), torch.tensor([10])).shape == (1, 1, 8, 16, 16)


@torch.no_grad()
def test_bfloat16_autocast_is_opt_in_and_returns_float32() -> None:
    network, x, t = _unet(), torch.randn(3, 1, 16, 16), torch.tensor([0, 400, 999])
    assert with_precision(network, "float32") is network
    wrapped = with_precision(network, "bfloat16")
    assert isinstance(wrapped, Autocast)
    exact, fast = network(x, t), wrapped(x, t)
    assert fast.dtype == torch.float32 and not torch.equal(fast, exact)  # computed in bfloat16
    assert float((fast - exact).norm() / exact.norm()) < 0.05
