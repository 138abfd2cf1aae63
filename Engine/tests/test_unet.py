"""The UNet and encoder reproduce openai guided-diffusion exactly, and add per-sample timesteps and null labels.

Reference outputs in data/guided_diffusion/ were computed by the upstream guided_diffusion/unet.py (see the
README there); nothing here compares the code against itself except the batching/null-label identities.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_engine.errors import ModelError
from diffusion_engine.nets.bundle import import_guided_diffusion, load_model
from diffusion_engine.nets.presets import PRESETS, build_preset, preset_config
from diffusion_engine.nets.unet import GroupNorm32, UNetModel, accepted_kwargs, build_network

DATA = Path(__file__).parent / "data" / "guided_diffusion"
CASES = load_file(str(DATA / "cases.safetensors"))
CASE_CONFIGS = json.loads((DATA / "cases.json").read_text())
# fp32 convolutions sum in a CPU-dependent order (oneDNN picks the kernel): the 3D case's outputs differ from the
# fixture by up to 4e-5 on an AVX-512-BF16 EPYC; a wrong formula or weight mapping differs by far more than 1e-4.
TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}


def formula_weights(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """The deterministic weights the fixture generator used for the "formula" cases (README.md)."""
    weights = {}
    for k, name in enumerate(sorted(shapes)):
        shape = shapes[name]
        n = math.prod(shape)
        wave = torch.sin(0.7 * torch.arange(n, dtype=torch.float64) + 1.3 * k + 0.5)
        if len(shape) == 1:
            value = (1.0 if name.endswith("weight") else 0.0) + 0.1 * wave
        else:
            value = wave * math.sqrt(3.0 / (n // shape[0]))
        weights[name] = value.reshape(shape).to(torch.float32)
    return weights


def fixture_network(stem: str) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((DATA / f"{stem}_config.json").read_text()), load_file(str(DATA / f"{stem}.safetensors"))


def network_with(class_name: str, kwargs: dict, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    net = build_network(class_name, kwargs).eval()
    net.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    return net


@pytest.fixture(scope="module")
def imported_unet(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    out = tmp_path_factory.mktemp("models") / "unet"
    import_guided_diffusion(DATA / "unet.safetensors", DATA / "unet_config.json", out, kind="anomaly")
    return load_model(out)


# ------------------------------------------------------------------------------------ upstream compatibility


@torch.no_grad()
def test_imported_guided_diffusion_unet_matches_upstream(imported_unet: torch.nn.Module) -> None:
    out = imported_unet(CASES["unet.x"], CASES["unet.t"], CASES["unet.y"])
    torch.testing.assert_close(out, CASES["unet.legacy_order.out"], **TOLERANCE)


@pytest.mark.parametrize("case", ["unet.new_order", "unet.plain_resample"])
@torch.no_grad()
def test_same_weights_other_attention_order_and_resampling_match_upstream(case: str) -> None:
    kwargs = CASE_CONFIGS["stored"][case]
    _, weights = fixture_network("unet")
    net = build_network("UNetModel", kwargs).eval()
    # the plain-resampling variant has no resampling ResBlocks: it takes the subset of keys it has
    net.load_state_dict({k: v.float() for k, v in weights.items() if k in net.state_dict()}, strict=True)
    out = net(CASES["unet.x"], CASES["unet.t"], CASES["unet.y"])
    torch.testing.assert_close(out, CASES[f"{case}.out"], **TOLERANCE)


@torch.no_grad()
def test_imported_attention_pool_encoder_matches_upstream(tmp_path: Path) -> None:
    import_guided_diffusion(DATA / "encoder.safetensors", DATA / "encoder_config.json", tmp_path / "reg",
                            kind="aging", network_name="regressor")
    net = load_model(tmp_path / "reg")
    torch.testing.assert_close(net(CASES["encoder.x"], CASES["encoder.t"]), CASES["encoder.out"], **TOLERANCE)


@pytest.mark.parametrize("case", sorted(CASE_CONFIGS["formula"]))
@torch.no_grad()
def test_variants_match_upstream(case: str) -> None:
    # conv resampling (the paper's setting), dims 1 and 3, and the adaptive/spatial/spatial_v2 pools
    spec = CASE_CONFIGS["formula"][case]
    net = build_network(spec["class"], spec["kwargs"]).eval()
    net.load_state_dict(formula_weights({k: list(v.shape) for k, v in net.state_dict().items()}), strict=True)
    args = [CASES[f"{case}.x"], CASES[f"{case}.t"]] + ([CASES[f"{case}.y"]] if f"{case}.y" in CASES else [])
    torch.testing.assert_close(net(*args), CASES[f"{case}.out"], **TOLERANCE)


@pytest.mark.parametrize("case", sorted(CASE_CONFIGS["shapes"]))
def test_parameter_names_and_shapes_equal_upstream(case: str) -> None:
    spec = CASE_CONFIGS["shapes"][case]
    with torch.device("meta"):
        net = build_network(spec["class"], spec["kwargs"])
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == spec["shapes"]
    assert sum(p.numel() for p in net.parameters()) == spec["num_parameters"]


def test_paper_preset_is_anofpdm_size() -> None:
    # engine.md / anofpdm.md: ~96M parameters; upstream guided-diffusion counts 96,319,492 for this config
    class_name, config = preset_config("paper")
    assert config == {**CASE_CONFIGS["shapes"]["paper"]["kwargs"], "num_head_channels": -1,
                      "use_new_attention_order": False}
    with torch.device("meta"):
        net = build_network(class_name, config)
    assert sum(p.numel() for p in net.parameters()) == 96_319_492


def test_presets_build_with_their_documented_sizes() -> None:
    expected_millions = {"tiny": (1, 3), "tiny-conv": (1, 3), "small": (8, 16), "paper": (90, 100),
                         "regressor": (0.3, 3)}
    assert set(PRESETS) == set(expected_millions)
    for name, (low, high) in expected_millions.items():
        with torch.device("meta"):
            net = build_preset(name)
        assert low <= sum(p.numel() for p in net.parameters()) / 1e6 <= high, name
    assert build_preset("tiny", in_channels=2).network_config["config"]["in_channels"] == 2


# ------------------------------------------------------------------------------------ per-sample conditioning


@pytest.fixture(scope="module")
def perturbed_unet() -> UNetModel:
    config, weights = fixture_network("unet")
    return network_with(config["class"], config["kwargs"], weights)


@torch.no_grad()
def test_per_sample_timesteps_equal_separate_runs(perturbed_unet: UNetModel) -> None:
    x, t, y = CASES["unet.x"], CASES["unet.t"], CASES["unet.y"]
    together = perturbed_unet(x, t, y)
    for i in range(x.shape[0]):
        alone = perturbed_unet(x[i:i + 1], t[i].item(), y[i:i + 1])  # python scalar timestep
        torch.testing.assert_close(together[i:i + 1], alone, **TOLERANCE)


@torch.no_grad()
def test_scalar_timestep_is_broadcast(perturbed_unet: UNetModel) -> None:
    x, y = CASES["unet.x"], CASES["unet.y"]
    expected = perturbed_unet(x, torch.full((4,), 250), y)
    for t in (250, torch.tensor(250), torch.tensor([250])):
        torch.testing.assert_close(perturbed_unet(x, t, y), expected, atol=0, rtol=0)


@torch.no_grad()
def test_null_label_is_a_zero_label_embedding(perturbed_unet: UNetModel) -> None:
    # independent derivation: the same network built unconditional (no label_emb at all)
    config, weights = fixture_network("unet")
    unconditional = network_with("UNetModel", {**config["kwargs"], "num_classes": None},
                                 {k: v for k, v in weights.items() if k != "label_emb.weight"})
    x, t, y = CASES["unet.x"], CASES["unet.t"], CASES["unet.y"]
    expected = unconditional(x, t)
    torch.testing.assert_close(perturbed_unet(x, t, None), expected, atol=0, rtol=0)
    mixed = torch.tensor([y[0], -1, y[2], -1])
    out = perturbed_unet(x, t, mixed)
    torch.testing.assert_close(out[[1, 3]], expected[[1, 3]], **TOLERANCE)
    torch.testing.assert_close(out[[0, 2]], CASES["unet.legacy_order.out"][[0, 2]], **TOLERANCE)


@torch.no_grad()
def test_guided_and_null_in_one_batched_call(perturbed_unet: UNetModel) -> None:
    x, t, y = CASES["unet.x"], CASES["unet.t"], CASES["unet.y"]
    both = perturbed_unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, -1)]))
    torch.testing.assert_close(both[:4], perturbed_unet(x, t, y), **TOLERANCE)
    torch.testing.assert_close(both[4:], perturbed_unet(x, t), **TOLERANCE)


def test_compatibility_flags_change_nothing(perturbed_unet: UNetModel) -> None:
    config, weights = fixture_network("unet")
    flagged = network_with("UNetModel", {**config["kwargs"], "use_fp16": True, "use_checkpoint": True}, weights)
    assert all(p.dtype == torch.float32 for p in flagged.parameters())
    x, t, y = CASES["unet.x"], CASES["unet.t"], CASES["unet.y"]
    out = flagged(x, t, y)
    out.square().mean().backward()  # trains like the plain network: gradients reach the input layer
    assert flagged.input_blocks[0][0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(out, perturbed_unet(x, t, y), atol=0, rtol=0)


def test_group_norm_computes_in_float32() -> None:
    norm = GroupNorm32(64)
    x = (torch.randn(2, 64, 4, 4) * 100 + 300).to(torch.bfloat16)
    expected = torch.nn.functional.group_norm(x.float(), 32, norm.weight, norm.bias, norm.eps).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_runs_under_bfloat16_autocast(perturbed_unet: UNetModel) -> None:
    x, t, y = CASES["unet.x"], CASES["unet.t"], CASES["unet.y"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = perturbed_unet(x, t, y)
    torch.testing.assert_close(out.float(), CASES["unet.legacy_order.out"], atol=0.1, rtol=0.1)


# ------------------------------------------------------------------------------------ errors


def test_build_network_names_accepted_arguments() -> None:
    kwargs = {**preset_config("tiny")[1], "attention_resolution": [8]}
    with pytest.raises(ModelError, match=r"unknown UNetModel argument.*attention_resolution.*accepted arguments are "
                                         r"image_size, in_channels"):
        build_network("UNetModel", kwargs)
    with pytest.raises(ModelError, match="Use one of UNetModel, EncoderUNetModel"):
        build_network("SuperResModel", {})
    with pytest.raises(ModelError, match=r"missing UNetModel argument.*num_res_blocks"):
        build_network("UNetModel", {k: v for k, v in preset_config("tiny")[1].items() if k != "num_res_blocks"})
    with pytest.raises(ModelError, match="pool must be one of"):
        build_network("EncoderUNetModel", {**preset_config("regressor")[1], "pool": "max"})
    with pytest.raises(ModelError, match="multiple of 32"):
        build_network("UNetModel", {**preset_config("tiny")[1], "model_channels": 48})
    with pytest.raises(ModelError, match="attention width 128 is not divisible by 3"):
        build_network("UNetModel", {**preset_config("small")[1], "num_heads_upsample": 3})
    with pytest.raises(ModelError, match="downsample factors"):
        build_network("UNetModel", {**preset_config("tiny")[1], "attention_resolutions": "16,8"})
    assert "pool" in accepted_kwargs("EncoderUNetModel") and "num_classes" not in accepted_kwargs("EncoderUNetModel")


def test_bad_inputs_are_explained(perturbed_unet: UNetModel) -> None:
    x, t = CASES["unet.x"], CASES["unet.t"]
    with pytest.raises(ValueError, match="class labels must be in"):
        perturbed_unet(x, t, torch.tensor([0, 1, 3, -1]))
    with pytest.raises(ValueError, match=r"one per sample"):
        perturbed_unet(x, t[:3])
    with pytest.raises(ValueError, match="expects input"):
        perturbed_unet(x[:, :1], t)
    with pytest.raises(ValueError, match="divisible by 2"):
        perturbed_unet(x[..., :7], t)
    unconditional = build_preset("tiny", num_classes=None)
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(torch.zeros(1, 1, 64, 64), 3, torch.tensor([1]))
