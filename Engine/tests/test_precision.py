"""Inference speed settings that keep the networks' meaning: channels_last convolutions and bfloat16 autocast."""

from __future__ import annotations

from pathlib import Path

import torch

from diffusion_engine.nets.bundle import channels_last_convolutions, load_bundle, save_bundle
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


def test_every_inference_loader_uses_channels_last_on_the_cpu_and_saving_still_works(tmp_path: Path) -> None:
    from diffusion_engine.aging.pipeline import resolve_model
    from diffusion_engine.restore.model import load_restore_model

    def layouts(network: torch.nn.Module) -> set[bool]:
        return {m.weight.is_contiguous(memory_format=torch.channels_last)
                for m in network.modules() if isinstance(m, torch.nn.Conv2d)}

    restore, aging = load_restore_model("demo", task="denoise"), resolve_model("demo")
    assert layouts(restore.eps) == layouts(aging.networks["eps"]) == layouts(aging.networks["regressor"]) == {True}
    copy = load_bundle(save_bundle(tmp_path / "copy", {"eps": restore.eps}, kind="restore"))
    for key, value in restore.eps.state_dict().items():
        assert torch.equal(copy.networks["eps"].state_dict()[key], value)


@torch.no_grad()
def test_bfloat16_autocast_is_opt_in_and_returns_float32() -> None:
    network, x, t = _unet(), torch.randn(3, 1, 16, 16), torch.tensor([0, 400, 999])
    assert with_precision(network, "float32") is network
    wrapped = with_precision(network, "bfloat16")
    assert isinstance(wrapped, Autocast)
    exact, fast = network(x, t), wrapped(x, t)
    assert fast.dtype == torch.float32 and not torch.equal(fast, exact)  # computed in bfloat16
    assert float((fast - exact).norm() / exact.norm()) < 0.05
