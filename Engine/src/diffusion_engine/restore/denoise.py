"""Denoising with an ordinary (unconditional) DDPM by noise-level matching (Daw et al., sec. 3.1 and 4.1).

The noisy image enters the reverse chain at the step whose expected noise matches its own (``noise.match_timestep``)
and is denoised by the remaining steps: deterministic DDIM or stochastic DDPM ancestral steps. Entering too early
(a step that expects less noise) leaves noise behind; too late (a step that expects more) makes the chain
invent a different image. Optional cycles feed the output back in at the step matching its remaining noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..schedule import CLEAN, Schedule, ddim_sampling_timesteps, ddim_step, ddpm_step
from .noise import TimestepMatch, enter_chain, estimate_sigma_gaussian, match_timestep, schedule_sigmas

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t [B, C, H, W], t [B]) -> predicted noise
SAMPLERS = ("ddim", "ddpm")


@dataclass(frozen=True)
class DenoiseSettings:
    sampler: str = "ddim"
    ddim_steps: int = 50  # at most this many DDIM steps from the entry step down to 0 (DDPM takes every step)
    cycles: int = 1
    seed: int = 0

    def validate(self) -> DenoiseSettings:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.ddim_steps < 1 or self.cycles < 1:
            raise ValueError("ddim_steps and cycles must be at least 1")
        return self


@dataclass
class DenoiseResult:
    image: torch.Tensor  # [B, C, H, W]
    matches: list[TimestepMatch] = field(default_factory=list)  # one per cycle that ran (entry sigma and t)


def reverse_chain(eps_fn: EpsFn, schedule: Schedule, x_t: torch.Tensor, t: int, settings: DenoiseSettings,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Run the reverse process from x_t at step t down to the clean image (x0 estimate)."""
    batch = x_t.shape[0]
    x = x_t
    if settings.sampler == "ddpm":
        for step in range(t, -1, -1):
            steps = torch.full((batch,), step, dtype=torch.long, device=x.device)
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x = ddpm_step(schedule, x, steps, eps_fn(x, steps), noise)
        return x
    grid = ddim_sampling_timesteps(t + 1, min(settings.ddim_steps, t + 1))
    for current, previous in zip(grid, [*grid[1:], CLEAN], strict=True):
        steps = torch.full((batch,), current, dtype=torch.long, device=x.device)
        x = ddim_step(schedule, x, steps, previous, eps_fn(x, steps))
    return x


def residual_sigma(image: torch.Tensor, mask: np.ndarray | None) -> float:
    """Gaussian noise estimate over a batch of slices (all channels), inside ``mask`` [B, H, W] when given."""
    data = image.detach().cpu().numpy()
    if mask is not None:
        mask = np.broadcast_to(np.asarray(mask, bool)[:, None], data.shape)
    return estimate_sigma_gaussian(data, mask)


@torch.no_grad()
def denoise(eps_fn: EpsFn, schedule: Schedule, noisy: torch.Tensor, sigma: float, settings: DenoiseSettings,
            *, mask: np.ndarray | None = None, t_override: int | None = None) -> DenoiseResult:
    """Denoise slices whose noise has standard deviation ``sigma`` (normalised units).

    ``t_override`` enters at that step instead of the matched one (to measure the effect of a wrong entry).
    Later cycles re-estimate the remaining noise inside ``mask`` and stop once the output is clean.
    """
    settings.validate()
    generator = torch.Generator().manual_seed(settings.seed)
    image, matches = noisy, []
    for cycle in range(settings.cycles):
        if cycle:
            sigma = residual_sigma(image, mask)
            if not np.isfinite(sigma):
                break
        match = match_timestep(schedule, sigma)
        if t_override is not None and cycle == 0:
            match = TimestepMatch(sigma=match.sigma, t=int(t_override),
                                  sigma_t=float(schedule_sigmas(schedule)[t_override]))
        if match.clean:
            break
        matches.append(match)
        image = reverse_chain(eps_fn, schedule, enter_chain(schedule, image, match.t), match.t, settings, generator)
    return DenoiseResult(image=image, matches=matches)
