"""The diffusion classifier: does the "unhealthy" or the "healthy" condition of the model denoise a slice better?

A class-conditional epsilon model scores each class c by its expected denoising error
E_t,eps ||eps - eps(x_t, t, c)||^2, the weighted ELBO that bounds -log p(x | c) (Ho et al. 2020); comparing classes
by it is the diffusion classifier of Li et al. 2023 ("Your diffusion model is secretly a zero-shot classifier") and
Clark & Jaini 2023. AnoFPDM's own divergence M_t is the gradient of this implicit classifier (the paper's eq. 13);
this score reads the classifier's value instead. With balanced classes in training (anomaly.training), the
difference

    s(x0) = mean over t and pixels of ( ||eps - eps(x_t, t, healthy)||^2 - ||eps - eps(x_t, t, unhealthy)||^2 ),
    x_t = q_sample(x0, t, eps),

rises with the log-odds that the slice is unhealthy, and `decision` calls a slice unhealthy when s >= thr_01
(calibrated on validation slices with image-level labels only, like the paper's cosine rule).

Choices:
- Timesteps: TIMESTEP_FRACTIONS of the schedule (0.05 T .. 0.3 T). Lesions change the image at the scales that
  low noise levels keep; at high noise both conditions predict much the same brain. On the demo model's validation
  slices one timestep's evidence (one noise draw) has AUROC 0.91-0.95 at t = 25-125, 0.77-0.93 and noisy from
  there to 0.73 T, and 0.55-0.75 from 0.83 T on; the mean over these six reaches 0.953
  (Engine/evaluations/anomaly_classifier_diagnostic.py, Engine/evaluations/anomaly/classifier.md).
- Noise: one draw per timestep, shared by both classes and by every slice (a paired comparison: the difference then
  measures the classes, not the noise) and fixed by a seed, so a slice's score does not depend on its batch.
- Cost: one network call per timestep on [x_t, x_t] with labels [healthy, unhealthy]: 2 evaluations per timestep,
  12 per slice, against the forward pass's 30 at the default stride.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import ModelError
from ..schedule import Schedule, q_sample

TIMESTEP_FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)

EpsModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def classifier_timesteps(num_timesteps: int) -> list[int]:
    """The 0-based timesteps the score averages over, for a schedule of ``num_timesteps`` steps."""
    return sorted({min(num_timesteps - 1, max(0, round(f * num_timesteps))) for f in TIMESTEP_FRACTIONS})


def classifier_noise(shape: Sequence[int], count: int, seed: int, device: torch.device | str = "cpu"
                     ) -> torch.Tensor:
    """``count`` standard normal images of one slice's ``shape`` [C, H, W], from ``seed``: [count, C, H, W]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((count, *shape), generator=generator).to(device)


def unhealthy_evidence(eps_model: EpsModel, schedule: Schedule, x0: torch.Tensor, *, healthy_label: int,
                       unhealthy_label: int, timesteps: Sequence[int], noise: torch.Tensor,
                       on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """s(x0) for a batch of preprocessed slices x0 [B, C, H, W]: [B] float64, larger = more likely unhealthy.

    noise [len(timesteps), C, H, W]: one image per timestep, shared by every slice (classifier_noise).
    """
    if x0.ndim != 4 or x0.shape[0] == 0:
        raise ValueError(f"x0 must be [B, C, H, W] with B >= 1, got {list(x0.shape)}")
    if noise.shape != (len(timesteps), *x0.shape[1:]):
        raise ValueError(f"noise must be [{len(timesteps)}, {', '.join(map(str, x0.shape[1:]))}], "
                         f"got {list(noise.shape)}")
    batch = x0.shape[0]
    labels = torch.cat([torch.full((batch,), healthy_label), torch.full((batch,), unhealthy_label)]).to(x0.device)
    gap = torch.zeros(batch, dtype=torch.float64, device=x0.device)
    with torch.no_grad():
        for t, eps in zip(timesteps, noise.to(x0), strict=True):
            eps = eps.expand_as(x0)
            x_t = q_sample(schedule, x0, t, eps)
            predicted = eps_model(torch.cat([x_t, x_t]), torch.full_like(labels, t), labels)
            if not isinstance(predicted, torch.Tensor) or predicted.shape != (2 * batch, *x0.shape[1:]):
                raise ModelError("the network returned the wrong shape for the diffusion classifier",
                                 fix="use an epsilon-prediction model whose output has the input's shape")
            error = ((predicted - torch.cat([eps, eps])) ** 2).flatten(1).mean(dim=1).double()
            gap += error[:batch] - error[batch:]
            if on_step is not None:
                on_step()
    gap /= len(timesteps)
    if not bool(torch.isfinite(gap).all()):
        raise ModelError("the network produced NaN or infinite predictions",
                         fix="check the model weights and that the input is normalised to [-1, 1]")
    return gap
