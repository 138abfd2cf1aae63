"""Restoration math: noise estimation, sigma -> t matching, matched denoising, CVDM schedule and losses, p_cond."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusion_engine.restore import conditional, cvdm, degrade
from diffusion_engine.restore.denoise import DenoiseSettings, denoise, reverse_chain
from diffusion_engine.restore.noise import (
    SigmaOutOfRange,
    enter_chain,
    estimate_sigma_gaussian,
    estimate_sigma_rician,
    match_timestep,
)
from diffusion_engine.schedule import cosine_schedule, linear_schedule, q_sample


def _reference_abar(T: int, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
    scale = 1000.0 / T
    return np.cumprod(1.0 - np.linspace(scale * start, scale * end, T))


def _phantom(size: int = 128) -> np.ndarray:
    """Smooth background, a bright disc with a sharp edge and a ramp: anatomy-like structure for the estimators."""
    yy, xx = np.mgrid[:size, :size] / size
    image = 0.3 * np.sin(2 * np.pi * xx) * np.cos(3 * np.pi * yy) + 0.2 * xx
    image[(yy - 0.5) ** 2 + (xx - 0.45) ** 2 < 0.08] += 0.6
    return image


# -- sigma -> t -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1000, 250])
def test_match_timestep_inverts_alpha_bar(T):
    schedule = linear_schedule(T)
    abar = _reference_abar(T)
    for t in [0, 1, 7, T // 10, T // 2, T - 2, T - 1]:
        sigma = math.sqrt((1 - abar[t]) / abar[t])  # noise that x_t / sqrt(abar_t) carries
        match = match_timestep(schedule, sigma)
        assert match.t == t
        assert 1.0 / (1.0 + match.sigma_t**2) == pytest.approx(abar[t], rel=1e-9)


def test_match_timestep_picks_the_nearest_log_snr_and_refuses_out_of_range():
    schedule = cosine_schedule(1000)
    abar = schedule.alphas_cumprod.numpy()
    sigma = 0.3
    snr_gap = np.abs(np.log(abar / (1 - abar)) - math.log(1 / sigma**2))
    assert match_timestep(schedule, sigma).t == int(np.argmin(snr_gap))
    with pytest.raises(SigmaOutOfRange):
        match_timestep(schedule, 2 * math.sqrt((1 - abar[-1]) / abar[-1]))
    first = math.sqrt((1 - abar[0]) / abar[0])
    assert match_timestep(schedule, 0.1 * first).clean


def test_entering_the_chain_gives_the_forward_marginal():
    schedule = linear_schedule(1000)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 1, 8, 8, generator=generator) * 2 - 1
    n = torch.randn(2, 1, 8, 8, generator=generator)
    t = 300
    abar = float(schedule.alphas_cumprod[t])
    noisy = x0 + math.sqrt((1 - abar) / abar) * n
    assert torch.allclose(enter_chain(schedule, noisy, t), q_sample(schedule, x0, t, n), atol=1e-6)


# -- noise estimators -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.02, 0.05, 0.1, 0.2])
def test_gaussian_estimator_recovers_sigma(sigma):
    rng = np.random.default_rng(1)
    noisy = _phantom() + sigma * rng.standard_normal((128, 128))
    assert estimate_sigma_gaussian(noisy) == pytest.approx(sigma, rel=0.08)


def test_gaussian_estimator_respects_the_mask_and_needs_blocks():
    rng = np.random.default_rng(2)
    image = _phantom()
    mask = np.zeros_like(image, bool)
    mask[16:112, 16:112] = True
    noisy = image + np.where(mask, 0.1, 0.5) * rng.standard_normal(image.shape)
    assert estimate_sigma_gaussian(noisy, mask) == pytest.approx(0.1, rel=0.08)
    assert math.isnan(estimate_sigma_gaussian(noisy[:8, :8]))


@pytest.mark.parametrize("sigma", [0.02, 0.08])
def test_rician_background_estimator_recovers_sigma(sigma):
    generator = torch.Generator().manual_seed(3)
    clean = torch.full((1, 1, 128, 128), -1.0)  # no signal: magnitude is pure Rayleigh noise in the background
    clean[..., 32:96, 32:96] = 0.4
    noisy = degrade.rician_noise(clean, sigma, generator).image[0, 0].numpy()
    background = np.ones((128, 128), bool)
    background[28:100, 28:100] = False
    magnitude = (noisy + 1) / 2  # back to [0, 1] magnitudes, where sigma is halved
    assert 2 * estimate_sigma_rician(magnitude, background) == pytest.approx(sigma, rel=0.05)


def test_rician_noise_at_zero_signal_has_rayleigh_mean():
    sigma = 0.1
    out = degrade.rician_noise(torch.full((4, 1, 64, 64), -1.0), sigma, torch.Generator().manual_seed(4)).image
    unit_mean = float(((out + 1) / 2).mean())
    assert unit_mean == pytest.approx(sigma / 2 * math.sqrt(math.pi / 2), rel=0.03)


# -- matched denoising ----------------------------------------------------------------------------------------


def _oracle(schedule, x0):
    """The exact noise predictor for data concentrated on x0: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    abar_table = schedule.alphas_cumprod.float()

    def eps_fn(x_t, t):
        abar = abar_table[t].reshape(-1, 1, 1, 1)
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()

    return eps_fn


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_reverse_chain_with_an_exact_predictor_returns_the_clean_image(sampler):
    schedule = linear_schedule(100)
    x0 = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    noisy = x0 + 0.3 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    result = denoise(_oracle(schedule, x0), schedule, noisy, 0.3, DenoiseSettings(sampler=sampler, ddim_steps=10))
    assert len(result.matches) == 1 and result.matches[0].t == match_timestep(schedule, 0.3).t
    assert torch.allclose(result.image, x0, atol=1e-4)


def test_denoise_skips_clean_images_and_honours_the_override():
    schedule = linear_schedule(100)
    x0 = torch.zeros(1, 1, 8, 8)
    calls = []

    def eps_fn(x_t, t):
        calls.append(int(t[0]))
        return torch.zeros_like(x_t)

    result = denoise(eps_fn, schedule, x0, 0.0, DenoiseSettings())
    assert result.matches == [] and torch.equal(result.image, x0) and not calls
    denoise(eps_fn, schedule, x0, 0.3, DenoiseSettings(ddim_steps=5), t_override=40)
    assert calls[0] == 40 and len(calls) == 5
    x = reverse_chain(eps_fn, schedule, torch.ones(1, 1, 8, 8), 3, DenoiseSettings(sampler="ddpm"))
    assert calls[-4:] == [3, 2, 1, 0] and x.shape == (1, 1, 8, 8)


# -- CVDM -------------------------------------------------------------------------------------------------------


def _scrambled(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 2)
    return module


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_time_networks_are_monotone_and_tau_int_starts_at_zero(seed):
    schedule = _scrambled(cvdm.LearnedSchedule("global"), seed)
    t = torch.linspace(0, 1, 2001)
    with torch.no_grad():
        for values in (schedule.tau_net(t), schedule.tau(t), schedule.tau_int(t)):
            assert bool((values[1:] - values[:-1] >= -1e-6).all())
        assert float(schedule.tau_int(torch.zeros(1))) == 0.0
        assert bool((schedule.tau(t) > 0).all())


def test_gamma_boundaries_of_the_linear_schedule():
    schedule = cvdm.LearnedSchedule("linear")
    x = torch.zeros(2, 1, 4, 4)
    at = lambda v: schedule.values(x, torch.full((2,), v)).gamma  # noqa: E731
    assert torch.allclose(at(0.0), torch.full_like(at(0.0), cvdm.GAMMA_MAX))
    # continuous linear betas: integral of 1000 (b0 + (b1 - b0) s) ds over [0, 0.99999]
    t1 = 0.99999
    expected = math.exp(-1000 * (1e-4 * t1 + 0.5 * (0.02 - 1e-4) * t1 * t1))
    assert float(at(1.0)[0, 0, 0, 0]) == pytest.approx(expected, rel=1e-5)
    # and the discrete ancestral schedule used for sampling lands near the same end point
    _, gamma = cvdm.discrete_schedule(schedule, x, steps=200)
    assert math.log(float(gamma[-1, 0, 0, 0, 0])) == pytest.approx(math.log(expected), rel=0.05)


def test_ode_residual_vanishes_for_an_analytic_schedule_and_not_for_a_random_one():
    x = torch.zeros(3, 1, 4, 4)
    t = torch.tensor([0.1, 0.5, 0.9])
    linear = cvdm.LearnedSchedule("linear")
    assert float(cvdm.ode_residual(linear.values(x, t, derivatives=True)).detach().abs().max()) < 1e-6
    learned = _scrambled(cvdm.LearnedSchedule("global"), 7)
    assert float(cvdm.ode_residual(learned.values(x, t, derivatives=True)).detach().abs().max()) > 1e-3


def test_gamma_derivatives_match_finite_differences():
    schedule = _scrambled(cvdm.LearnedSchedule("global"), 3).double()
    with torch.no_grad():
        schedule.raw_m.fill_(-1.0)  # m about 0.3: gamma stays inside the clip range
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    t, h = torch.tensor([0.4], dtype=torch.float64), 1e-4
    gamma = lambda s: schedule.values(x, s).gamma  # noqa: E731
    values = schedule.values(x, t, derivatives=True)
    first = (gamma(t + h) - gamma(t - h)) / (2 * h)
    second = (gamma(t + h) - 2 * gamma(t) + gamma(t - h)) / h**2
    assert torch.allclose(values.d_gamma, first, rtol=1e-5)
    assert torch.allclose(values.d2_gamma, second, rtol=1e-3, atol=1e-6)


def test_prior_kl_matches_the_closed_form_and_torch_distributions():
    y = torch.tensor([-0.8, 0.0, 0.5, 1.0])
    gamma = torch.tensor([0.3, 1e-3, 0.01, 0.9])
    mean, var = gamma.sqrt() * y, 1 - gamma
    closed = 0.5 * (mean**2 + var - 1 - torch.log(var))
    assert torch.allclose(cvdm.prior_kl(y, gamma), closed, atol=1e-6)
    reference = torch.distributions.kl_divergence(torch.distributions.Normal(mean, var.sqrt()),
                                                  torch.distributions.Normal(0.0, 1.0))
    assert torch.allclose(cvdm.prior_kl(y, gamma), reference, atol=1e-6)


def _tiny_unet(in_channels: int) -> torch.nn.Module:
    from diffusion_engine.nets.unet import build_network

    return build_network("UNetModel", {"image_size": 16, "in_channels": in_channels, "model_channels": 32,
                                       "out_channels": 1, "num_res_blocks": 1, "attention_resolutions": [],
                                       "channel_mult": [1, 2], "num_head_channels": -1})


def test_cvdm_loss_trains_every_part_and_sampling_runs():
    torch.manual_seed(0)
    eps_net, schedule = _tiny_unet(3), cvdm.LearnedSchedule("pixel", _tiny_unet(1))
    generator = torch.Generator().manual_seed(0)
    y = torch.rand(2, 1, 16, 16, generator=generator) * 2 - 1
    x = degrade.downsample(y, 2).image
    loss = cvdm.cvdm_loss(eps_net, schedule, y, x, torch.rand(2, generator=generator), torch.randn_like(y))
    loss.total.backward()
    assert all(torch.isfinite(v) for v in (loss.noise, loss.schedule, loss.kl, loss.curvature))
    for module in (schedule.tau_net, schedule.tau_int_net, schedule.pixel_net, eps_net):
        assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in module.parameters())
    out = cvdm.sample(eps_net, schedule, x, steps=5, generator=generator)
    assert out.shape == y.shape and torch.isfinite(out).all()
    assert cvdm.schedule_map(schedule, x).shape == (2, 1, 16, 16)


# -- conditional DDPM ---------------------------------------------------------------------------------------


def test_p_cond_formula_and_range():
    noisy = torch.zeros(3, 1, 8, 8)
    x_t = torch.stack([torch.zeros(1, 8, 8), torch.full((1, 8, 8), 0.25), torch.full((1, 8, 8), 1.5)])
    p = conditional.p_cond(x_t, noisy)
    expected = torch.tensor([0.0, 1 - math.exp(-0.25), 1 - math.exp(-1.5)])
    assert torch.allclose(p, expected, atol=1e-6)
    assert float(conditional.p_cond(x_t, noisy, temperature=10.0)[2]) < float(p[2])


def test_probabilistic_conditioning_masks_the_condition():
    schedule = linear_schedule(100)
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x, t):
            seen.append(x[:, 1:].flatten(1).abs().sum(1) > 0)
            return torch.zeros_like(x[:, :1])

    x0 = torch.zeros(400, 1, 4, 4)
    condition = torch.ones(400, 1, 4, 4)
    t = torch.full((400,), 99)  # x_t is almost pure noise: rms distance to the condition about sqrt(2)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    uniform = torch.rand(400, generator=torch.Generator().manual_seed(1))
    conditional.conditional_loss(schedule, probabilistic=True)(Probe(), (x0, condition, t, noise, uniform))
    kept = float(seen[0].float().mean())
    expected = float(conditional.p_cond(q_sample(schedule, x0, t, noise), condition).mean())
    assert kept == pytest.approx(expected, abs=0.06)


# -- degradations -------------------------------------------------------------------------------------------


def test_degradations():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 32, 32, generator=generator) * 2 - 1
    dropped = degrade.drop_voxels(x, 0.3, generator)
    assert float(1 - dropped.known.mean()) == pytest.approx(0.3, abs=0.03)
    assert torch.equal(dropped.image[dropped.known.bool()], x[dropped.known.bool()])
    assert bool((dropped.image[~dropped.known.bool()] == degrade.FILL).all())
    lines = degrade.drop_lines(x, 0.5, generator)
    assert bool((lines.known.amin(dim=3) == lines.known.amax(dim=3)).all())
    box = degrade.drop_box(x, 8, generator)
    assert int((box.known == 0).sum()) == 4 * 64
    within = torch.zeros(4, 1, 32, 32, dtype=torch.bool)
    within[:, :, 20:24, 2:6] = True  # a small region near the left edge: the square is centred on it
    inside = degrade.drop_box(x, 8, generator, within=within)
    assert int((inside.known == 0).sum()) == 4 * 64
    assert bool((inside.known[within] == 0).all())
    constant = torch.full((1, 1, 32, 32), 0.3)
    assert torch.allclose(degrade.downsample(constant, 4).image, constant)
    with pytest.raises(ValueError):
        degrade.downsample(x, 3)


def test_training_crops_are_windows_of_their_slices_and_bad_crops_are_refused():
    from diffusion_engine.errors import InputError
    from diffusion_engine.restore import training

    images = torch.arange(3 * 64 * 64, dtype=torch.float32).reshape(3, 1, 64, 64)
    crops = training.random_crops(images, 32, torch.Generator().manual_seed(0))
    assert crops.shape == (3, 1, 32, 32)
    for image, crop in zip(images, crops, strict=True):
        top, left = divmod(int(crop[0, 0, 0] - image[0, 0, 0]), 64)
        assert torch.equal(crop, image[:, top:top + 32, left:left + 32])
    for crop in (20, 8, 128):
        with pytest.raises(InputError, match="crop size"):
            training._check("denoise", "ddpm", (), (0.02, 0.3), crop, 64)


@pytest.mark.parametrize("start", [1.0, 0.3, 0.02])
def test_truncated_chains_with_an_exact_predictor_return_the_target(start):
    """The chain started part-way from the diffused condition is still a valid reverse process: an exact noise
    predictor (which knows the target) recovers the target from any start, for DDIM and for CVDM sampling."""
    from diffusion_engine.schedule import linear_schedule

    generator = torch.Generator().manual_seed(0)
    target = torch.rand(2, 1, 16, 16, generator=generator) * 2 - 1
    condition = target + 0.3 * torch.randn(target.shape, generator=generator)
    schedule = linear_schedule(1000)
    abar = torch.as_tensor(schedule.alphas_cumprod, dtype=torch.float32)

    class Exact(torch.nn.Module):
        def forward(self, x, t):
            a = abar[t].reshape(-1, 1, 1, 1)
            return (x[:, :1] - a.sqrt() * target) / (1 - a).sqrt()

    out = conditional.sample_conditional(Exact(), schedule, condition, steps=20, probabilistic=False,
                                         generator=generator, start=start)
    assert torch.allclose(out, target, atol=1e-4)

    class ExactCVDM(torch.nn.Module):
        def forward(self, x, t):  # input: z, condition, gamma map
            gamma = x[:, 2:3]
            return (x[:, :1] - gamma.sqrt() * target) / (1 - gamma).sqrt()

    learned = cvdm.LearnedSchedule("linear")
    out = cvdm.sample(ExactCVDM(), learned, condition, steps=50, generator=generator, start=start)
    assert torch.allclose(out, target, atol=1e-3)
