"""ONLS core math (aging.onls): grid, variance stopping rule, guidance, decoding. Expected values are derived
independently (closed forms of hand-made networks, the DDIM formula written out), never from the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffusion_engine.aging.onls import (
    batch_variance,
    decode,
    encode,
    encoding_grid,
    first_below,
    guidance_strength,
    guided_eps,
    noise_level,
    regressor_with_gradient,
    timestep_for_level,
)
from diffusion_engine.errors import InputError
from diffusion_engine.nets.presets import build_preset
from diffusion_engine.schedule import linear_schedule

SCHEDULE = linear_schedule(1000)
ABAR = SCHEDULE.alphas_cumprod.numpy()


class ZeroEps(nn.Module):
    """eps = 0: DDIM inversion is x_t = sqrt(abar_t) x0 and decoding undoes it exactly."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled(), "the UNet must never run with gradients enabled"
        return torch.zeros_like(x)


class MeanRegressor(nn.Module):
    """R(x, t) = mean of the slice: with ZeroEps, R(x_t) = sqrt(abar_t) * mean(x0)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))[:, None]


class QuadraticRegressor(nn.Module):
    """R(x) = sum(w * x^2): dR/dx = 2 w x."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (self.w * x**2).sum(dim=(1, 2, 3))[:, None]


def test_grid_holds_every_tenth_noise_level() -> None:
    grid = encoding_grid(1000, 10)
    assert grid == [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    assert [noise_level(t, 1000) for t in grid] == pytest.approx([0.1 * k for k in range(1, 11)])
    assert encoding_grid(1000, 20)[-1] == 999 and len(set(encoding_grid(1000, 20))) == 20
    assert timestep_for_level(0.4, grid, 1000) == 399
    assert timestep_for_level(1.0, encoding_grid(1000, 20), 1000) == 999
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(InputError):
            timestep_for_level(bad, grid, 1000)
    with pytest.raises(InputError):
        encoding_grid(1000, 0)


def test_variance_rule_on_hand_built_outputs() -> None:
    outputs = [np.array([0.3, 0.5, 0.7]), np.array([0.45, 0.5, 0.55]), np.array([0.499, 0.5, 0.501])]
    variances = [batch_variance(torch.tensor(o)) for o in outputs]
    assert variances == pytest.approx([np.var(o) for o in outputs])  # population variance
    assert first_below(variances, 1e-4) == 2  # var = 6.7e-7
    assert first_below(variances, 1e-2) == 1  # var = 1.7e-3
    assert first_below(variances, 1e-9) is None
    assert first_below([1e-4], 1e-4) is None  # strictly below


def test_onls_stop_matches_closed_form() -> None:
    means = torch.tensor([0.1, 0.3, 0.5, 0.8, 0.9])
    x0 = means[:, None, None, None].expand(5, 1, 8, 8).contiguous()
    grid = encoding_grid(1000, 20)
    zeta = 1e-3
    # Var_t = abar_t * Var(means): the first grid t where it falls below zeta
    expected_var = [ABAR[t] * float(np.var(means.numpy())) for t in grid]
    expected_t0 = next(t for t, v in zip(grid, expected_var, strict=True) if v < zeta)
    encoding = encode(ZeroEps(), MeanRegressor(), SCHEDULE, x0, grid, zeta=zeta, keep=[399])
    assert encoding.t0 == expected_t0
    assert encoding.variance == pytest.approx(expected_var[: len(encoding.variance)], rel=1e-4)
    # it stops at t0 unless a kept latent lies further
    assert encoding.timesteps[-1] == max(expected_t0, 399)
    assert torch.allclose(encoding.latents[399], math.sqrt(ABAR[399]) * x0, atol=1e-6)
    # a fallback latent is kept on the way without extending the encoding; never passed, never kept
    fallback = grid[grid.index(expected_t0) - 1]
    passing = encode(ZeroEps(), MeanRegressor(), SCHEDULE, x0, grid, zeta=zeta, keep_if_passed=[fallback, 999])
    assert passing.timesteps[-1] == expected_t0 and set(passing.latents) == {fallback, expected_t0}
    assert torch.allclose(passing.latents[fallback], math.sqrt(ABAR[fallback]) * x0, atol=1e-6)


def test_variance_rule_reads_only_the_given_rows() -> None:
    means = torch.tensor([5.0, 0.3, 0.5, 0.8, -5.0])  # the outer rows would dominate any variance over all five
    x0 = means[:, None, None, None].expand(5, 1, 8, 8).contiguous()
    grid = encoding_grid(1000, 20)
    encoding = encode(ZeroEps(), MeanRegressor(), SCHEDULE, x0, grid, zeta=1e-3, variance_rows=slice(1, 4))
    expected = [ABAR[t] * float(np.var(means[1:4].numpy())) for t in encoding.timesteps]
    assert encoding.variance == pytest.approx(expected, rel=1e-4)
    assert encoding.clean_prediction.tolist() == pytest.approx(means[1:4].tolist())
    assert encoding.regressor_rows == 3 * (1 + len(encoding.timesteps))
    assert encoding.eps_rows == 5 * len(encoding.timesteps)  # every row is still encoded


def test_reconstruction_without_guidance_is_exact_for_zero_eps() -> None:
    x0 = torch.randn(3, 1, 8, 8)
    grid = encoding_grid(1000, 10)
    encoding = encode(ZeroEps(), MeanRegressor(), SCHEDULE, x0, grid, keep=[599])
    decoded = decode(ZeroEps(), MeanRegressor(), SCHEDULE, encoding.latents[599], 599, grid, 0.5, scale=0.0)
    assert decoded.timesteps == [599, 499, 399, 299, 199, 99]
    assert torch.allclose(decoded.images, x0, atol=1e-5)


def test_guidance_strength_variants() -> None:
    r, y = torch.tensor([0.25, 0.64, -0.1]), torch.tensor(0.5)
    assert guidance_strength(r, y, "linear") == pytest.approx(torch.tensor([0.25, -0.14, 0.6]))
    assert guidance_strength(r, y, "sqrt") == pytest.approx(torch.tensor([0.25 * 0.5, -0.14 * 0.8, 0.0]))
    with pytest.raises(InputError):
        guidance_strength(r, y, "quadratic")


def test_guided_step_equals_independent_formula() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64).float()
    w = torch.rand(1, 4, 4) * 0.1
    regressor = QuadraticRegressor(w.clone())
    t, t_prev, c, target = 499, 399, 3.0, 0.8
    prediction, gradient = regressor_with_gradient(regressor, x, t, chunk_size=1)
    xn, wn = x.double().numpy(), w.double().numpy()
    r_expected = (wn * xn**2).sum(axis=(1, 2, 3))
    grad_expected = 2 * wn * xn
    assert prediction.numpy() == pytest.approx(r_expected, rel=1e-5)
    assert np.allclose(gradient.numpy(), grad_expected, atol=1e-6)
    assert regressor.w.grad is None  # gradient w.r.t. the input only
    eps = torch.randn_like(x)
    hat = guided_eps(SCHEDULE, eps, gradient, prediction, torch.tensor(target), t, c, "linear")
    s = (target - r_expected)[:, None, None, None]
    hat_expected = eps.double().numpy() - c * s * math.sqrt(1 - ABAR[t]) * grad_expected
    assert np.allclose(hat.numpy(), hat_expected, atol=1e-5)
    # one decode step from t to t_prev with a fixed eps network reproduces the written-out DDIM update
    fixed = torch.randn_like(x)

    class FixedEps(nn.Module):
        def forward(self, inputs: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
            assert not torch.is_grad_enabled()
            return fixed.expand_as(inputs)

    result = decode(FixedEps(), regressor, SCHEDULE, x, t, [t_prev, t], target, scale=c).images
    hat_fixed = fixed.double().numpy() - c * s * math.sqrt(1 - ABAR[t]) * grad_expected
    x0_hat = (xn - math.sqrt(1 - ABAR[t]) * hat_fixed) / math.sqrt(ABAR[t])
    after_t = math.sqrt(ABAR[t_prev]) * x0_hat + math.sqrt(1 - ABAR[t_prev]) * hat_fixed
    # the second step (t_prev -> clean) is checked by running decode from t_prev on the first step's result
    second = decode(FixedEps(), regressor, SCHEDULE, torch.from_numpy(after_t).float(), t_prev, [t_prev], target,
                    scale=c).images
    assert torch.allclose(result, second, atol=1e-4)


def test_unet_gets_no_gradient_during_guided_decoding() -> None:
    torch.manual_seed(1)
    unet = build_preset("tiny", image_size=16, num_classes=None, channel_mult=[1, 2], attention_resolutions=[])
    regressor = build_preset("regressor", image_size=16, channel_mult=[1, 2], attention_resolutions=[])
    with torch.no_grad():  # fresh networks have zeroed output layers: R would be constant
        for parameter in (*unet.parameters(), *regressor.parameters()):
            if not parameter.any():
                parameter.normal_(std=0.05)
    calls = {"unet_grad": 0}

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        calls["unet_grad"] += int(torch.is_grad_enabled() or output.requires_grad)

    unet.register_forward_hook(hook)
    x = torch.randn(3, 1, 16, 16)
    out = decode(unet, regressor, SCHEDULE, x, 299, encoding_grid(1000, 10), 0.7, scale=50.0)
    assert calls["unet_grad"] == 0
    assert all(p.grad is None for p in unet.parameters())
    assert all(p.grad is None for p in regressor.parameters())
    assert not out.images.requires_grad
    plain = decode(unet, regressor, SCHEDULE, x, 299, encoding_grid(1000, 10), 0.7, scale=0.0)
    assert not torch.allclose(out.images, plain.images)  # the guidance did change the result
