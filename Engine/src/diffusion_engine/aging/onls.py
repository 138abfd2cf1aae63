"""ONLS core on model slices: DDIM encoding with the variance stopping rule, and regressor-guided DDIM decoding.

Spec: shared/specs/onls.md (paper: Wang, ICLR 2024 Tiny Papers, Algorithm 1 and Sec. 2). All slices of one
subject form the batch. Timesteps are 0-based (t = -1 is the clean image); the strided grid is
t_k = round(k T / n) - 1, k = 1..n, so it ends at T - 1 and every noise level L = (t + 1) / T in 0.1 steps lies
on it for n = 10, 20, 50, ... Nothing here reads files or knows about volumes.

- encoding (abduction): x_{t_k} = DDIM inversion of x_{t_{k-1}} with eps(x_{t_{k-1}}, t_{k-1}); the clean image's
  eps is evaluated at timestep 0 (the network is not trained at "t = -1").
- ONLS stop: after each encoding step, Var over the batch of R(x_t, t) (population variance); the first t with
  Var < zeta is t0, the per-subject noise level is L = (t0 + 1) / T.
- decoding under intervention: eps_hat = eps - c * s_r * sqrt(1 - abar_t) * dR/dx_t with s_r = y - R
  ("linear") or (y - R) * sqrt(R) (the paper's "sqrt" variant), then a deterministic DDIM step to the previous
  grid timestep. The UNet runs under no_grad; the gradient is taken through the regressor only, on a detached x_t.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InputError, ModelError
from ..schedule import CLEAN, Schedule, alpha_bar, ddim_invert_step, ddim_step

GUIDANCE_VARIANTS = ("linear", "sqrt")
PAPER_ZETA = 1e-4  # paper E.4, normalised-age units


def encoding_grid(num_timesteps: int, steps: int) -> list[int]:
    """Ascending grid t_k = round(k T / n) - 1, k = 1..n (ends at T - 1)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise InputError(f"the number of DDIM steps must be an integer in [1, {num_timesteps}], got {steps!r}",
                         fix="use e.g. 10 or 20 steps")
    return [(2 * k * num_timesteps + steps) // (2 * steps) - 1 for k in range(1, steps + 1)]


def noise_level(t: int, num_timesteps: int) -> float:
    """L = (t + 1) / T for a 0-based timestep (L = 1 is pure noise at t = T - 1)."""
    return (t + 1) / num_timesteps


def timestep_for_level(level: float, grid: Sequence[int], num_timesteps: int) -> int:
    """The grid timestep whose noise level is closest to ``level`` (0 < L <= 1)."""
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < level <= 1.0:
        raise InputError(f"noise level L must be in (0, 1], got {level!r}", fix="use e.g. 0.6")
    return min(grid, key=lambda t: abs(noise_level(t, num_timesteps) - level))


def batch_variance(predictions: torch.Tensor) -> float:
    """Population variance of the regressor outputs over the batch (the slices of one subject)."""
    return float(predictions.double().var(unbiased=False))


def first_below(variances: Sequence[float], zeta: float) -> int | None:
    """Index of the first variance strictly below zeta (ONLS's stopping step), or None."""
    return next((k for k, value in enumerate(variances) if value < zeta), None)


def _chunks(count: int, size: int) -> Iterable[slice]:
    return (slice(start, min(start + size, count)) for start in range(0, count, size))


def _check(output: torch.Tensor, name: str) -> torch.Tensor:
    if not bool(torch.isfinite(output).all()):
        raise ModelError(f"the {name} network returned NaN or infinite values",
                         fix="check the model weights and that the input is normalised to [-1, 1]")
    return output


@torch.no_grad()
def predict(network: nn.Module, x: torch.Tensor, t: int, chunk_size: int) -> torch.Tensor:
    """network(x, t) in chunks of slices, without building a graph."""
    steps = torch.full((x.shape[0],), max(t, 0), dtype=torch.long, device=x.device)
    return torch.cat([_check(network(x[rows], steps[rows]).float(), "epsilon")
                      for rows in _chunks(x.shape[0], chunk_size)])


def regressor_with_gradient(regressor: nn.Module, x_t: torch.Tensor, t: int,
                            chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(R(x_t, t) [B], dR/dx_t [B, C, H, W]) through the regressor only: x_t is detached first.

    Each output depends on its own slice only (no batch statistics in the network), so the gradient of the sum is
    every slice's own gradient.
    """
    values, gradients = [], []
    for rows in _chunks(x_t.shape[0], chunk_size):
        with torch.enable_grad():
            x = x_t[rows].detach().requires_grad_(True)
            steps = torch.full((x.shape[0],), max(t, 0), dtype=torch.long, device=x.device)
            out = _check(regressor(x, steps)[:, 0].float(), "regressor")
            (gradient,) = torch.autograd.grad(out.sum(), x)
        values.append(out.detach())
        gradients.append(gradient)
    return torch.cat(values), torch.cat(gradients)


def guidance_strength(prediction: torch.Tensor, target: torch.Tensor, variant: str) -> torch.Tensor:
    """s_r = y - R ("linear") or (y - R) sqrt(R) ("sqrt", the paper's algorithm box; R clamped at 0)."""
    if variant not in GUIDANCE_VARIANTS:
        raise InputError(f"guidance variant must be one of {list(GUIDANCE_VARIANTS)}, got {variant!r}",
                         fix="use 'linear'")
    strength = target - prediction
    return strength * prediction.clamp(min=0.0).sqrt() if variant == "sqrt" else strength


def guided_eps(schedule: Schedule, eps: torch.Tensor, gradient: torch.Tensor, prediction: torch.Tensor,
               target: torch.Tensor, t: int, scale: float, variant: str) -> torch.Tensor:
    """eps_hat = eps - c * s_r * sqrt(1 - abar_t) * dR/dx_t (per slice)."""
    strength = guidance_strength(prediction, target, variant).reshape(-1, *([1] * (eps.ndim - 1)))
    sigma = (1.0 - alpha_bar(schedule, t, eps)).sqrt()
    return eps - scale * strength.to(eps.dtype) * sigma * gradient


@dataclass(eq=False)
class Encoding:
    """What one encoding pass gives: latents at the requested timesteps and the ONLS statistics."""

    timesteps: list[int]  # grid steps visited, ascending
    variance: list[float]  # Var_batch R(x_t, t) at each visited step
    mean_prediction: list[float]  # mean R(x_t, t) at each visited step (normalised age)
    latents: dict[int, torch.Tensor] = field(default_factory=dict)  # timestep -> x_t [B, C, H, W]
    t0: int | None = None  # ONLS stop (None: zeta not given, or never reached)
    clean_prediction: torch.Tensor | None = None  # R(x_0, 0) per slice
    eps_rows: int = 0  # slices through the UNet (network evaluations)
    regressor_rows: int = 0


def encode(eps_model: nn.Module, regressor: nn.Module, schedule: Schedule, x0: torch.Tensor, grid: Sequence[int], *,
           zeta: float | None = None, keep: Iterable[int] = (), keep_if_passed: Iterable[int] = (),
           variance_rows: slice = slice(None), chunk_size: int = 64,
           on_step: Callable[[], None] | None = None) -> Encoding:
    """DDIM-invert x0 along ``grid``, keeping the latents at ``keep`` and stopping at the ONLS step when ``zeta``
    is given (the encoding goes on to the largest ``keep`` timestep if that lies further). Latents at
    ``keep_if_passed`` are kept when the encoding passes them, without extending it (a fallback level for when the
    variance rule never fires, so that no second encoding is needed). The regressor reads only ``variance_rows``
    of the batch (default all): the slices whose variance decides the stop.
    """
    keep, passed = sorted(set(keep)), set(keep_if_passed)
    unknown = [t for t in [*keep, *passed] if t not in grid]
    if unknown:
        raise ValueError(f"timesteps {unknown} are not on the encoding grid")
    x, t_prev = x0.float(), CLEAN
    encoding = Encoding(timesteps=[], variance=[], mean_prediction=[],
                        clean_prediction=predict(regressor, x[variance_rows], 0, chunk_size)[:, 0])
    encoding.regressor_rows += len(encoding.clean_prediction)
    last = max(keep, default=None)
    for t in grid:
        eps = predict(eps_model, x, t_prev, chunk_size)
        x = ddim_invert_step(schedule, x, t_prev, t, eps)
        r = predict(regressor, x[variance_rows], t, chunk_size)[:, 0]
        encoding.eps_rows += x.shape[0]
        encoding.regressor_rows += len(r)
        encoding.timesteps.append(t)
        encoding.variance.append(batch_variance(r))
        encoding.mean_prediction.append(float(r.mean()))
        if t in keep or t in passed:
            encoding.latents[t] = x.clone()
        if zeta is not None and encoding.t0 is None and encoding.variance[-1] < zeta:
            encoding.t0 = t
            encoding.latents[t] = x.clone()
        if on_step is not None:
            on_step()
        done_onls = zeta is None or encoding.t0 is not None
        if done_onls and (last is None or t >= last):
            break
        t_prev = t
    return encoding


@dataclass(eq=False)
class Decoding:
    images: torch.Tensor  # [B, C, H, W] counterfactual x_0
    timesteps: list[int]  # grid steps decoded from, descending
    mean_prediction: list[float]  # mean R(x_t, t) before each step
    eps_rows: int = 0
    regressor_rows: int = 0


def decode(eps_model: nn.Module, regressor: nn.Module, schedule: Schedule, x_t: torch.Tensor, t0: int,
           grid: Sequence[int], target: torch.Tensor | float, *, scale: float, variant: str = "linear",
           chunk_size: int = 64, on_step: Callable[[], None] | None = None) -> Decoding:
    """Regressor-guided deterministic DDIM from x_{t0} down the grid to the clean image.

    ``target`` is the normalised target age, one value or one per slice (stacked copies with different targets
    decode an age sweep in one batch). ``scale`` = 0 is plain DDIM reconstruction.
    """
    if t0 not in grid:
        raise ValueError(f"t0 = {t0} is not on the decoding grid")
    steps = sorted((t for t in grid if t <= t0), reverse=True)
    target = torch.as_tensor(target, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
    x = x_t.float()
    result = Decoding(images=x, timesteps=steps, mean_prediction=[])
    for index, t in enumerate(steps):
        t_prev = steps[index + 1] if index + 1 < len(steps) else CLEAN
        eps = predict(eps_model, x, t, chunk_size)
        result.eps_rows += x.shape[0]
        if scale != 0.0:
            prediction, gradient = regressor_with_gradient(regressor, x, t, chunk_size)
            result.regressor_rows += x.shape[0]
            result.mean_prediction.append(float(prediction.mean()))
            eps = guided_eps(schedule, eps, gradient, prediction, target, t, scale, variant)
        x = ddim_step(schedule, x, t, t_prev, eps)
        if on_step is not None:
            on_step()
    result.images = x
    return result
