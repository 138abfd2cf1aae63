"""CVDM (Della Maggiora et al., ICLR 2024): a conditional diffusion model with a learned pixel-wise schedule.

Continuous time t in [0, 1]. The schedule factorises as beta(t, x) = m(x) tau(t), with m(x) >= 0 per pixel
(softplus of a small network on the condition image x) and tau(t) > 0 from a monotone network. The signal level
gamma(t, x) (abar of a DDPM) is parametrised directly as exp(-m(x) tau_int(t)) with tau_int another monotone
network that is 0 at t = 0 (its output is multiplied by t), clipped to [1e-6, 0.99999]. Nothing forces
tau_int' = tau; the loss does (the Deep Galerkin residual of d gamma / dt = -beta gamma, paper eq. 4):

    L = ||eps_hat - eps||^2                                         (noise prediction, t ~ U(0, 1))
      + 2 [ (d gamma/dt + beta gamma)^2 + (gamma(0) - 1)^2 + gamma(1)^2 ]
      + 2 KL(q(z_1 | y) || N(0, 1))                                 (prior term, closed form per pixel)
      + 2 * 0.001 (d^2 gamma / dt^2)^2                              (curvature regulariser)

with the weights [1, 2, 2, 2] of the authors' code. The time derivatives are exact: gamma depends on t only
through tau_int, so d gamma/dt = -m tau_int' gamma and d^2 gamma/dt^2 = gamma (m^2 tau_int'^2 - m tau_int''),
with tau_int' and tau_int'' from autograd on the scalar network (clipped pixels have zero derivative, as in the
clipped reference implementation).

Ablations: "global" (CVDM-simple: one learned m for every pixel and image) and "linear" (fixed m = 1 and the
continuous-time limit of DDPM's linear betas, tau(t) = T (b0 + (b1 - b0) t), tau_int its exact integral), which
satisfies the ODE exactly and makes the same machinery a plain conditional DDPM.

Sampling (paper Algorithm 2): T steps, alpha_i = clip(1 - beta(i / T, x) / T), gamma_i = prod_{j <= i} alpha_j
per pixel, ancestral steps with the posterior variance (1 - gamma_{i-1}) beta_i / (1 - gamma_i).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GAMMA_MIN, GAMMA_MAX = 1e-6, 0.99999
T_MAX = 0.99999  # the reference implementation's clip of t
CURVATURE_WEIGHT = 0.001
LOSS_WEIGHTS = (1.0, 2.0, 2.0, 2.0)  # noise, schedule (ODE + boundaries), KL, curvature
SCHEDULE_KINDS = ("pixel", "global", "linear")
LINEAR_T, LINEAR_B0, LINEAR_B1 = 1000, 1e-4, 0.02  # DDPM's linear schedule in continuous time
SAMPLING_STEPS = 200


class MonotoneNet(nn.Module):
    """Increasing scalar function of t (Kingma et al.'s VDM network): f(t) = l1(t) + l3(sigmoid(l2(l1(t)))),
    every weight positive (softplus of a free parameter), so each layer, and hence f, is increasing in t."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(1))
        self.b1 = nn.Parameter(torch.zeros(1))
        self.w2 = nn.Parameter(torch.randn(hidden) * 0.5)
        self.b2 = nn.Parameter(torch.randn(hidden) * 0.5)
        self.w3 = nn.Parameter(torch.zeros(hidden))
        self.b3 = nn.Parameter(torch.zeros(1))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h1 = F.softplus(self.w1) * t + self.b1
        h2 = torch.sigmoid(F.softplus(self.w2) * h1.unsqueeze(-1) + self.b2)
        return h1 + h2 @ F.softplus(self.w3) / self.w3.numel() + self.b3


@dataclass
class ScheduleValues:
    """The schedule at one time per sample: gamma and beta [B, 1, H, W] (or broadcastable), and the derivatives."""

    gamma: torch.Tensor
    beta: torch.Tensor
    d_gamma: torch.Tensor | None = None
    d2_gamma: torch.Tensor | None = None


class LearnedSchedule(nn.Module):
    """beta(t, x) = m(x) tau(t) and gamma(t, x) = exp(-m(x) tau_int(t)); ``kind`` picks how m is made.

    ``pixel_net`` (kind "pixel") maps the condition [B, C, H, W] to one channel; it is called with timestep 0
    (a guided-diffusion UNet, so that bundles can store it). tau and tau_int are separate monotone networks.
    """

    def __init__(self, kind: str = "pixel", pixel_net: nn.Module | None = None, hidden: int = 64):
        super().__init__()
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule kind must be one of {SCHEDULE_KINDS}, got {kind!r}")
        if (kind == "pixel") != (pixel_net is not None):
            raise ValueError("a pixel-wise schedule needs pixel_net, the other kinds none")
        self.kind = kind
        self.pixel_net = pixel_net
        if kind != "linear":
            self.tau_net = MonotoneNet(hidden)
            self.tau_int_net = MonotoneNet(hidden)
        if kind == "global":
            self.raw_m = nn.Parameter(torch.zeros(1))

    # -- the factors ----------------------------------------------------------------------------------------

    def m(self, condition: torch.Tensor) -> torch.Tensor:
        """m(x) >= 0: [B, 1, H, W] (pixel) or [B, 1, 1, 1] (global, linear)."""
        batch = condition.shape[0]
        if self.kind == "pixel":
            zeros = torch.zeros(batch, device=condition.device)
            return F.softplus(self.pixel_net(condition, zeros))
        if self.kind == "global":
            return F.softplus(self.raw_m).reshape(1, 1, 1, 1).expand(batch, 1, 1, 1)
        return torch.ones(batch, 1, 1, 1, device=condition.device, dtype=condition.dtype)

    def tau(self, t: torch.Tensor) -> torch.Tensor:
        """tau(t) > 0, one per sample [B]."""
        if self.kind == "linear":
            return LINEAR_T * (LINEAR_B0 + (LINEAR_B1 - LINEAR_B0) * t)
        return F.softplus(self.tau_net(t))

    def tau_int(self, t: torch.Tensor) -> torch.Tensor:
        """tau_int(t) >= 0, increasing, tau_int(0) = 0, one per sample [B]."""
        if self.kind == "linear":
            return LINEAR_T * (LINEAR_B0 * t + 0.5 * (LINEAR_B1 - LINEAR_B0) * t * t)
        return t * F.softplus(self.tau_int_net(t))

    # -- gamma, beta and their time derivatives ------------------------------------------------------------

    def values(self, condition: torch.Tensor, t: torch.Tensor, *, derivatives: bool = False,
               m: torch.Tensor | None = None) -> ScheduleValues:
        """gamma, beta at t [B] (clipped to [0, T_MAX]); with ``derivatives`` also d gamma/dt and d^2 gamma/dt^2."""
        m = self.m(condition) if m is None else m
        t = t.clamp(0.0, T_MAX)
        if derivatives:
            t = t.detach().requires_grad_(True)
        first = second = None
        with torch.set_grad_enabled(derivatives or torch.is_grad_enabled()):
            integral = self.tau_int(t)
            if derivatives:  # each tau_int(t_b) depends on t_b only, so the gradient of the sum is per sample
                first = torch.autograd.grad(integral.sum(), t, create_graph=True)[0]
                second = torch.autograd.grad(first.sum(), t, create_graph=True, allow_unused=True)[0]
                second = torch.zeros_like(first) if second is None else second
        shape = (-1, 1, 1, 1)
        raw = torch.exp(-m * integral.reshape(shape))
        gamma = raw.clamp(GAMMA_MIN, GAMMA_MAX)
        beta = m * self.tau(t).reshape(shape)
        if not derivatives:
            return ScheduleValues(gamma=gamma, beta=beta)
        inside = ((raw > GAMMA_MIN) & (raw < GAMMA_MAX)).to(raw.dtype)
        d1, d2 = first.reshape(shape), second.reshape(shape)
        d_gamma = -m * d1 * raw * inside
        d2_gamma = raw * (m * m * d1 * d1 - m * d2) * inside
        return ScheduleValues(gamma=gamma, beta=beta, d_gamma=d_gamma, d2_gamma=d2_gamma)


# -- loss terms -------------------------------------------------------------------------------------------


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def prior_kl(y: torch.Tensor, gamma_1: torch.Tensor) -> torch.Tensor:
    """KL(q(z_1 | y) || N(0, 1)) per pixel, q(z_1 | y) = N(sqrt(gamma_1) y, 1 - gamma_1)."""
    zeros = torch.zeros_like(y)
    return normal_kl(gamma_1.sqrt() * y, torch.log1p(-gamma_1).expand_as(y), zeros, zeros)


def ode_residual(values: ScheduleValues) -> torch.Tensor:
    """d gamma/dt + beta gamma: zero when gamma solves the schedule's ODE (paper eq. 4)."""
    return values.d_gamma + values.beta * values.gamma


def noise_model_input(z_t: torch.Tensor, condition: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """The noise model's input: concat(noisy target, condition, gamma map) along channels."""
    return torch.cat([z_t, condition, gamma.expand(z_t.shape[0], 1, *z_t.shape[2:])], dim=1)


def predict_noise(eps_net: nn.Module, z_t: torch.Tensor, condition: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """eps_hat from a guided-diffusion UNet given timestep 0 throughout (the gamma map carries the time)."""
    zeros = torch.zeros(z_t.shape[0], device=z_t.device)
    return eps_net(noise_model_input(z_t, condition, gamma), zeros)


@dataclass
class CVDMLoss:
    total: torch.Tensor
    noise: torch.Tensor
    schedule: torch.Tensor
    kl: torch.Tensor
    curvature: torch.Tensor


def cvdm_loss(eps_net: nn.Module, schedule: LearnedSchedule, y: torch.Tensor, condition: torch.Tensor,
              t: torch.Tensor, noise: torch.Tensor) -> CVDMLoss:
    """The full CVDM loss on a batch: target y, condition x, times t ~ U(0, 1) [B], noise like y."""
    m = schedule.m(condition)
    at_t = schedule.values(condition, t, derivatives=True, m=m)
    z_t = at_t.gamma.sqrt() * y + (1.0 - at_t.gamma).sqrt() * noise
    noise_term = F.mse_loss(predict_noise(eps_net, z_t, condition, at_t.gamma), noise)
    start = schedule.values(condition, torch.zeros_like(t), m=m).gamma
    end = schedule.values(condition, torch.ones_like(t), m=m).gamma
    schedule_term = (ode_residual(at_t) ** 2).mean() + ((start - 1.0) ** 2).mean() + (end**2).mean()
    kl_term = prior_kl(y, end).mean()
    curvature_term = CURVATURE_WEIGHT * (at_t.d2_gamma**2).mean()
    terms = (noise_term, schedule_term, kl_term, curvature_term)
    total = sum(w * v for w, v in zip(LOSS_WEIGHTS, terms, strict=True))
    return CVDMLoss(total, *terms)


# -- sampling ---------------------------------------------------------------------------------------------


def discrete_schedule(schedule: LearnedSchedule, condition: torch.Tensor, steps: int = SAMPLING_STEPS
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel (betas, gammas), each [steps, B, 1, H, W]: beta_i = clip(beta(i/T, x) / T), gamma = cumprod(1-beta)."""
    m = schedule.m(condition)
    betas = []
    for i in range(1, steps + 1):
        t = torch.full((condition.shape[0],), i / steps, device=condition.device)
        betas.append((schedule.values(condition, t, m=m).beta / steps).clamp(1e-8, 1.0 - 1e-5))
    beta = torch.stack(betas)
    return beta, torch.cumprod(1.0 - beta, dim=0)


@torch.no_grad()
def sample(eps_net: nn.Module, schedule: LearnedSchedule, condition: torch.Tensor, *, channels: int = 1,
           steps: int = SAMPLING_STEPS, generator: torch.Generator | None = None, clip: bool = True,
           on_step: object = None, start: float = 1.0) -> torch.Tensor:
    """One ancestral sample y ~ p(y | x) per condition image [B, C, H, W] -> [B, channels, H, W].

    ``start`` 1 is Algorithm 2 from pure noise; below 1 the chain starts at t = start from the condition image
    diffused with the learned schedule to that time (as conditional.sample_conditional's ``start``).
    """
    beta, gamma = discrete_schedule(schedule, condition, steps)
    shape = (condition.shape[0], channels, *condition.shape[2:])
    z = torch.randn(shape, generator=generator).to(condition.device)
    first = steps - 1 if start >= 1 else max(0, round(start * steps) - 1)
    if first < steps - 1:
        z = gamma[first].sqrt() * condition[:, :channels] + (1.0 - gamma[first]).sqrt() * z
    for i in range(first, -1, -1):
        g, b = gamma[i], beta[i]
        g_prev = gamma[i - 1] if i else torch.ones_like(g)
        eps = predict_noise(eps_net, z, condition, g)
        x0 = (z - (1.0 - g).sqrt() * eps) / g.sqrt()
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
        mean = (g_prev.sqrt() * b / (1.0 - g)) * x0 + ((1.0 - b).sqrt() * (1.0 - g_prev) / (1.0 - g)) * z
        if i:
            variance = (1.0 - g_prev) * b / (1.0 - g)
            z = mean + variance.sqrt() * torch.randn(shape, generator=generator).to(z.device)
        else:
            z = mean
        if callable(on_step):
            on_step()
    return z


def schedule_map(schedule: LearnedSchedule, condition: torch.Tensor) -> torch.Tensor:
    """The learned schedule's magnitude per pixel, m(x) * tau_int(1) [B, 1, H, W] (the paper's uncertainty proxy)."""
    with torch.no_grad():
        one = torch.ones(condition.shape[0], device=condition.device)
        return (schedule.m(condition) * schedule.tau_int(one).reshape(-1, 1, 1, 1)).expand(
            condition.shape[0], 1, *condition.shape[2:])


def log_snr(gamma: torch.Tensor) -> torch.Tensor:
    return torch.log(gamma) - torch.log1p(-gamma)

