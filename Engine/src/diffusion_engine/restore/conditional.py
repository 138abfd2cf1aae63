"""Conditional DDPM restoration (Daw et al., sec. 3.2-3.3): the degraded slice is an extra input channel.

The epsilon UNet sees concat(x_t, condition): p(x | x_noisy) or p(x | x_missing_pixels). For noise, the paper
conditions with probability

    p_cond(t) = 1 - exp(-||x_t - x_noisy||_2 / T_c)

by masking (zeroing) the condition channels otherwise, so that near the end of the chain, where x_t is close
to the noisy input, the model leans on the image prior rather than copying the noise. The norm is the
root-mean-square over the slice (the L2 norm divided by sqrt(#voxels)): with it, T_c = 1 keeps p_cond in about
0.2..0.8 on [-1, 1] images, the range the paper reports, whatever the slice size. Sampling uses the expectation
of that masking: eps = eps_masked + p_cond(t) (eps_conditioned - eps_masked), both in one batched call.
Imputation conditions always (the paper needs no trick there) and keeps the observed voxels in the output.
A conditional denoiser can also take the noisy slice in at its noise-matched step (sec. 3.1's entry, with this
blended prediction: ``RestoreModel.denoiser_eps``), which is how the pipeline denoises unless asked for a start.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..schedule import CLEAN, Schedule, ddim_sampling_timesteps, ddim_step, q_sample

DEFAULT_TEMPERATURE = 1.0  # the paper's T_c


def condition_distance(x_t: torch.Tensor, condition_image: torch.Tensor) -> torch.Tensor:
    """Root-mean-square distance per sample [B] between x_t and the degraded image."""
    return (x_t - condition_image).flatten(1).pow(2).mean(dim=1).sqrt()


def p_cond(x_t: torch.Tensor, condition_image: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE
           ) -> torch.Tensor:
    """Probability of conditioning per sample [B]: 1 - exp(-rms(x_t - x_noisy) / T_c)."""
    return 1.0 - torch.exp(-condition_distance(x_t, condition_image) / temperature)


def conditional_loss(schedule: Schedule, *, probabilistic: bool, temperature: float = DEFAULT_TEMPERATURE,
                     channels: int = 1) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]:
    """Noise MSE on batches (x0, condition, t, noise, uniform); ``uniform`` [B] in [0, 1) draws the masking.

    ``condition``'s first ``channels`` channels are the degraded image (what p_cond compares x_t with); any
    further channels (the imputation mask) are masked together with it.
    """

    def loss(network: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x0, condition, t, noise, uniform = batch
        x_t = q_sample(schedule, x0, t, noise)
        if probabilistic:
            keep = (uniform < p_cond(x_t, condition[:, :channels], temperature)).to(x0.dtype)
            condition = condition * keep.reshape(-1, 1, 1, 1)
        return F.mse_loss(network(torch.cat([x_t, condition], dim=1), t), noise)

    return loss


def guided_eps(network: nn.Module, x_t: torch.Tensor, condition: torch.Tensor, t: torch.Tensor, *,
               probabilistic: bool, temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """Predicted noise at sampling time: conditioned, or the p_cond-weighted blend with the masked prediction."""
    if not probabilistic:
        return network(torch.cat([x_t, condition], dim=1), t)
    both = torch.cat([torch.cat([x_t, condition], 1), torch.cat([x_t, torch.zeros_like(condition)], 1)])
    eps_cond, eps_masked = network(both, torch.cat([t, t])).chunk(2)
    weight = p_cond(x_t, condition[:, : x_t.shape[1]], temperature).reshape(-1, 1, 1, 1)
    return eps_masked + weight * (eps_cond - eps_masked)


@torch.no_grad()
def sample_conditional(network: nn.Module, schedule: Schedule, condition: torch.Tensor, *, channels: int = 1,
                       steps: int = 50, eta: float = 1.0, probabilistic: bool,
                       temperature: float = DEFAULT_TEMPERATURE, generator: torch.Generator | None = None,
                       on_step: Callable[[], None] | None = None, start: float = 1.0) -> torch.Tensor:
    """x0 ~ p(x | condition) by DDIM (``eta`` 1: DDPM-like stochastic, 0: deterministic).

    ``start`` 1 is the paper's chain from pure noise. Below 1 the chain starts at step start * (T - 1) from the
    degraded image diffused to that step (Chung et al.'s "come closer, diffuse faster"): the steps at the highest
    noise, where a briefly trained model's x0 estimates are poorest, are skipped.
    """
    shape = (condition.shape[0], channels, *condition.shape[2:])
    x = torch.randn(shape, generator=generator).to(condition.device)
    first = schedule.num_timesteps - 1 if start >= 1 else max(0, round(start * (schedule.num_timesteps - 1)))
    if first < schedule.num_timesteps - 1:
        steps_from = torch.full((shape[0],), first, dtype=torch.long, device=x.device)
        x = q_sample(schedule, condition[:, :channels], steps_from, x)
    grid = ddim_sampling_timesteps(first + 1, min(steps, first + 1))
    for current, previous in zip(grid, [*grid[1:], CLEAN], strict=True):
        t = torch.full((shape[0],), current, dtype=torch.long, device=x.device)
        eps = guided_eps(network, x, condition, t, probabilistic=probabilistic, temperature=temperature)
        noise = torch.randn(shape, generator=generator).to(x.device) if eta > 0 else None
        x = ddim_step(schedule, x, t, previous, eps, eta=eta, noise=noise, clip_x0=True)
        if on_step is not None:
            on_step()
    return x
