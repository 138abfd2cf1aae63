"""AnoFPDM core (anomaly/forward, threshold, decision, calibration) against independent derivations:
closed forms from an oracle network, a slow reference loop that stores whole trajectories and calls the network
separately for every prediction (like the authors' code), numpy/scipy, and hand-made inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from diffusion_engine.anomaly import (
    NULL_LABEL,
    calibrate_m_max,
    calibrate_thr_01,
    classification_accuracy,
    cosine_similarity,
    decide,
    decision_values,
    forward_statistics,
    is_unhealthy,
    median_filter,
    mixed_setting_masks,
    modality_thresholds,
    quantile_level,
    quantile_range,
    remove_small_components,
    segment,
    select_guidance,
)
from diffusion_engine.anomaly.classifier import classifier_noise, classifier_timesteps, unhealthy_evidence
from diffusion_engine.errors import InputError, ModelError
from diffusion_engine.schedule import linear_schedule

T = 100
SCHEDULE = linear_schedule(T)
# independent abar: guided-diffusion's linear betas rescaled by 1000 / T
ABAR = torch.from_numpy(np.cumprod(1.0 - np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)))


def noise_to(x: torch.Tensor, t: torch.Tensor, x0_target: torch.Tensor) -> torch.Tensor:
    """The eps for which x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) equals x0_target."""
    abar = ABAR[t].to(x.dtype)[:, None, None, None]
    return (x - abar.sqrt() * x0_target) / (1 - abar).sqrt()


class Oracle:
    """A network that knows the answer: its null label predicts the input x0 exactly and its healthy label predicts
    x0 + g(t) (xh - x0) with a bump g peaking at a chosen timestep per slice and channel."""

    def __init__(self, x0: torch.Tensor, xh: torch.Tensor, centres: torch.Tensor, width: float = 6.0):
        self.x0, self.xh, self.centres, self.width = x0, xh, centres.double(), width
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def g(self, t: float | torch.Tensor) -> torch.Tensor:
        return torch.exp(-(((torch.as_tensor(t, dtype=torch.float64) - self.centres) / self.width) ** 2))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.clone(), t.clone(), y.clone()))
        target = torch.empty_like(x)
        for label in y.unique():
            rows = torch.nonzero(y == label).flatten()  # the k-th row of a label group is slice k
            if int(label) == NULL_LABEL:
                target[rows] = self.x0
            else:
                g = torch.stack([self.g(int(t[r]))[k] for k, r in enumerate(rows)])[..., None, None]
                target[rows] = self.x0 + g * (self.xh - self.x0)
        return noise_to(x, t, target)


class Net:
    """A deterministic nonlinear stand-in for the UNet whose output depends on x_t, t and the label, so that the
    encoding matters and the divergence peaks at different steps for different slices and channels."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.outputs: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tf = t.to(x.dtype)[:, None, None, None]
        base = 0.5 * torch.tanh(x + 0.2 * torch.roll(x, 1, dims=-1)) + 0.05 * torch.cos(tf / 7)
        centre = 8 + 40 * torch.sigmoid(4 * x.mean(dim=(-2, -1), keepdim=True))
        scale = (1 / ABAR[t].to(x.dtype) - 1).rsqrt()[:, None, None, None]
        guide = 0.3 * torch.exp(-(((tf - centre) / 6) ** 2)) * scale * torch.sigmoid(2 * x)
        out = base + (y >= 0).to(x.dtype)[:, None, None, None] * guide
        self.calls.append((x.clone(), t.clone(), y.clone()))
        self.outputs.append(out.clone())
        return out


def images(shape: tuple[int, ...], seed: int, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(shape, generator=g, dtype=torch.float64)


def naive_forward(net, x0, *, w, grid, encoding="ddim", reference="null", mods=None, end="inclusive",
                  fixed_end_step=None, noises=None, healthy=0):
    """The spec written out plainly: whole trajectories kept, one network call per prediction (plus one more
    for the DDIM encoding step, as the code), then argmax and means over the stored maps."""
    batch = x0.shape[0]
    mods = list(range(x0.shape[1])) if mods is None else mods
    lab_h, lab_null = torch.full((batch,), healthy), torch.full((batch,), NULL_LABEL)
    x0h, x0u = [], []
    x = x_prev = x0
    for k, t in enumerate(grid):
        a = ABAR[t]
        if encoding == "ddpm":
            x = a.sqrt() * x0 + (1 - a).sqrt() * noises[k]
        elif k > 0:
            tp = grid[k - 1]
            e = net(x_prev, torch.full((batch,), tp), lab_null)
            x0_pred = (x_prev - (1 - ABAR[tp]).sqrt() * e) / ABAR[tp].sqrt()
            x = a.sqrt() * x0_pred + (1 - a).sqrt() * e
        tt = torch.full((batch,), t)
        e_h, e_n = net(x, tt, lab_h), net(x, tt, lab_null)

        def pred(e, x=x, a=a):
            return ((x - (1 - a).sqrt() * e) / a.sqrt()).clamp(-1, 1)

        x0h.append(pred((1 + w) * e_h - w * e_n)[:, mods])
        x0u.append(pred(e_n if reference == "null" else e_h)[:, mods])
        x_prev = x
    x0h, x0u, target = torch.stack(x0h).numpy(), torch.stack(x0u).numpy(), x0[:, mods].numpy()
    M = ((x0h - x0u) ** 2).mean(axis=(-2, -1))  # [n, B, M]
    S = (x0h - target[None]) ** 2  # [n, B, M, H, W]
    peak = np.argmax(M, axis=0)  # first maximum
    if fixed_end_step is not None:
        end_idx = np.full_like(peak, grid.index(fixed_end_step))
    else:
        end_idx = peak if end == "inclusive" else np.maximum(peak - 1, 0)
    H = np.zeros(S.shape[1:])
    last = np.zeros(S.shape[1:])
    for b in range(S.shape[1]):
        for m in range(S.shape[2]):
            H[b, m] = S[: end_idx[b, m] + 1, b, m].mean(axis=0)
            last[b, m] = S[end_idx[b, m], b, m]
    return {
        "M": np.moveaxis(M, 0, -1), "mse_h": np.moveaxis(((x0h - target[None]) ** 2).mean(axis=(-2, -1)), 0, -1),
        "mse_u": np.moveaxis(((x0u - target[None]) ** 2).mean(axis=(-2, -1)), 0, -1),
        "peak": peak, "end": end_idx, "H": H, "last": last, "M_te": M.max(axis=0),
    }


# -- forward pass ------------------------------------------------------------------------------------------------


def oracle_setup(centres):
    x0 = images((3, 2, 6, 6), 1, -0.5, 0.5)
    xh = images((3, 2, 6, 6), 2)  # some of x0 + (1 + w)(xh - x0) leaves [-1, 1]: the clamp is exercised
    return x0, xh, Oracle(x0, xh, torch.tensor(centres))


@pytest.mark.parametrize(("encoding", "stride"), [("ddim", 1), ("ddpm", 1), ("ddim", 4)])
def test_oracle_closed_form(encoding, stride):
    w = 2.0
    x0, xh, oracle = oracle_setup([[0, 20], [36, 12], [44, 4]])
    stats = forward_statistics(oracle, SCHEDULE, x0, w=w, t_max=60, stride=stride, encoding=encoding,
                               generator=torch.Generator().manual_seed(0))
    grid = list(range(0, 60, stride))
    assert stats.timesteps == grid
    g = torch.stack([oracle.g(t) for t in grid], dim=-1)  # [B, M, n]
    x0_h = (x0[..., None] + (1 + w) * g[:, :, None, None] * (xh - x0)[..., None]).clamp(-1, 1)  # [B,M,H,W,n]
    sam = (x0_h - x0[..., None]) ** 2
    expected_M = sam.mean(dim=(2, 3))  # the reference x0_u is x0 itself
    torch.testing.assert_close(stats.divergence, expected_M, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.mse_healthy, expected_M, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.mse_reference, torch.zeros_like(expected_M), rtol=0, atol=1e-12)
    assert stats.peak_step.tolist() == [[0, 20], [36, 12], [44, 4]]  # the bump centres are on every grid here
    k_e = stats.peak_index
    for b in range(3):
        for m in range(2):
            k = int(k_e[b, m])
            torch.testing.assert_close(stats.aggregated[b, m], sam[b, m, ..., : k + 1].mean(-1), rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(stats.last_sam[b, m], sam[b, m, ..., k], rtol=1e-9, atol=1e-12)
            assert float(stats.peak_divergence[b, m]) == pytest.approx(float(expected_M[b, m, k]), rel=1e-9)
    torch.testing.assert_close(stats.aggregated_mean, stats.aggregated.mean(1))
    assert stats.network_calls == len(grid)
    assert stats.network_evaluations == 2 * len(grid)


def test_oracle_code_reference_and_cosine():
    """reference="healthy_w0": x0_u = x0 + g (xh - x0), so M_t = w^2 g^2 |xh - x0|^2 / d (without clamping)."""
    w = 1.5
    x0 = images((2, 1, 5, 5), 3, -0.2, 0.2)
    xh = images((2, 1, 5, 5), 4, -0.2, 0.2)  # |2.5 xh - 1.5 x0| < 1: no clamping
    oracle = Oracle(x0, xh, torch.tensor([[10.0], [30.0]]))
    stats = forward_statistics(oracle, SCHEDULE, x0, w=w, t_max=50, reference="healthy_w0")
    g = torch.stack([oracle.g(t) for t in range(50)], dim=-1)
    d2 = ((xh - x0) ** 2).mean(dim=(2, 3))[..., None]
    torch.testing.assert_close(stats.divergence, w**2 * g**2 * d2, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(stats.mse_reference, g**2 * d2, rtol=1e-9, atol=1e-14)
    # MSE^h = (1 + w)^2 MSE^u: proportional sequences, cosine 1 (a healthy-looking slice)
    torch.testing.assert_close(cosine_similarity(stats.mse_healthy, stats.mse_reference),
                               torch.ones(2, dtype=torch.float64))
    assert stats.network_evaluations == 2 * 50  # no extra evaluation for the code's reference


@pytest.mark.parametrize(
    "options",
    [
        {"encoding": "ddim", "reference": "null", "end": "inclusive", "stride": 1},
        {"encoding": "ddim", "reference": "healthy_w0", "end": "exclusive", "stride": 3},
        {"encoding": "ddpm", "reference": "null", "end": "inclusive", "stride": 2},
        {"encoding": "ddim", "reference": "null", "end": "exclusive", "stride": 1, "modalities": [2, 0]},
        {"encoding": "ddim", "reference": "null", "end": "inclusive", "stride": 2, "fixed_end_step": 14},
    ],
)
def test_matches_naive_reference_loop(options):
    options = dict(options)
    stride, mods = options.pop("stride"), options.pop("modalities", None)
    x0 = images((4, 3, 6, 6), 5)
    x0[1] *= 0.2  # different contents: different peaks
    x0[2] = x0[2].abs()
    w, t_max = 3.0, 60
    grid = list(range(0, t_max, stride))
    noises = None
    if options["encoding"] == "ddpm":
        gen = torch.Generator().manual_seed(11)
        noises = [torch.randn(x0.shape, generator=gen, dtype=x0.dtype) for _ in grid]
    ref = naive_forward(Net(), x0, w=w, grid=grid, mods=mods, noises=noises, **options)
    assert len(set(ref["peak"].ravel().tolist())) > 1, "test setup: peaks should differ between slices"

    net = Net()
    stats = forward_statistics(net, SCHEDULE, x0, w=w, t_max=t_max, stride=stride, modalities=mods,
                               generator=torch.Generator().manual_seed(11), **options)
    assert stats.timesteps == grid
    assert stats.modalities == (mods or [0, 1, 2])
    for name, key in [("divergence", "M"), ("mse_healthy", "mse_h"), ("mse_reference", "mse_u"),
                      ("aggregated", "H"), ("last_sam", "last"), ("peak_divergence", "M_te")]:
        np.testing.assert_allclose(getattr(stats, name).numpy(), ref[key], rtol=1e-9, atol=1e-12, err_msg=name)
    np.testing.assert_array_equal(stats.peak_index.numpy(), ref["peak"])
    np.testing.assert_array_equal(stats.end_index.numpy(), ref["end"])
    np.testing.assert_array_equal(stats.end_step.numpy(), np.asarray(grid)[ref["end"]])
    assert stats.network_calls == len(net.calls) == len(grid)
    assert stats.network_evaluations == 2 * len(grid)
    json.dumps(stats.settings)


def test_one_batched_call_per_step_reuses_the_null_eps():
    x0 = images((2, 2, 5, 5), 6)
    net = Net()
    stats = forward_statistics(net, SCHEDULE, x0, w=1.0, t_max=30, stride=5, healthy_label=2)
    grid = list(range(0, 30, 5))
    assert len(net.calls) == len(grid) == stats.network_calls
    for k, (x, t, y) in enumerate(net.calls):
        assert x.shape[0] == 4 and t.tolist() == [grid[k]] * 4 and y.tolist() == [2, 2, NULL_LABEL, NULL_LABEL]
        torch.testing.assert_close(x[:2], x[2:], rtol=0, atol=0)  # the same x_t for both labels
        if k == 0:
            torch.testing.assert_close(x[:2], x0, rtol=0, atol=0)  # DDIM starts from the clean image
        else:  # x_t was moved from the previous step with that step's null output: no separate encoder call
            xp, tp, e = net.calls[k - 1][0][:2], grid[k - 1], net.outputs[k - 1][2:]
            x0_pred = (xp - (1 - ABAR[tp]).sqrt() * e) / ABAR[tp].sqrt()
            expected = ABAR[grid[k]].sqrt() * x0_pred + (1 - ABAR[grid[k]]).sqrt() * e
            torch.testing.assert_close(x[:2], expected, rtol=1e-12, atol=1e-12)
    # the code's reference at w = 0 with stochastic encoding needs no null label at all: one evaluation per step
    net = Net()
    stats = forward_statistics(net, SCHEDULE, x0, w=0.0, t_max=10, encoding="ddpm", reference="healthy_w0")
    assert stats.network_evaluations == 10 and all(y.tolist() == [0, 0] for _, _, y in net.calls)
    torch.testing.assert_close(stats.divergence, torch.zeros_like(stats.divergence))
    assert stats.peak_index.eq(0).all()  # a flat M_t: the first maximum


def test_memory_does_not_grow_with_steps():
    x0 = images((2, 2, 6, 6), 7)
    sizes = []
    for t_max in (10, 80):
        stats = forward_statistics(Net(), SCHEDULE, x0, w=1.0, t_max=t_max)
        tensors = {k: v for k, v in vars(stats).items() if isinstance(v, torch.Tensor)}
        for name, value in tensors.items():
            assert value.ndim <= 4, name
            if value.shape[-2:] == (6, 6):
                assert value.shape == (2, 2, 6, 6), name  # maps: no step axis
            else:
                assert value.shape in {(2, 2), (2, 2, t_max)}, name  # scalars and per-step scalar curves
        sizes.append(sum(v.numel() for v in tensors.values() if v.shape[-2:] == (6, 6)))
    assert sizes[0] == sizes[1]


def test_end_step_at_the_first_step_is_guarded():
    x0, _, oracle = oracle_setup([[0, 0], [0, 0], [0, 0]])
    incl = forward_statistics(oracle, SCHEDULE, x0, w=1.0, t_max=40, end="inclusive")
    excl = forward_statistics(oracle, SCHEDULE, x0, w=1.0, t_max=40, end="exclusive")
    assert incl.peak_index.eq(0).all() and excl.end_index.eq(0).all()
    assert torch.isfinite(excl.aggregated).all()  # the code's mean over an empty range would be NaN
    torch.testing.assert_close(excl.aggregated, incl.last_sam)
    torch.testing.assert_close(excl.aggregated, excl.last_sam)


def test_exclusive_end_and_fixed_end_step():
    x0, xh, oracle = oracle_setup([[16, 16], [8, 24], [32, 4]])
    sam = torch.stack([((x0 + 2 * oracle.g(t)[..., None, None] * (xh - x0)).clamp(-1, 1) - x0) ** 2
                       for t in range(0, 40, 4)], dim=-1)  # w = 1, grid 0, 4, ..., 36
    excl = forward_statistics(oracle, SCHEDULE, x0, w=1.0, t_max=40, stride=4, end="exclusive")
    k = torch.tensor([[4, 4], [2, 6], [8, 1]])
    assert excl.peak_index.equal(k) and excl.end_index.equal(k - 1)
    for b in range(3):
        for m in range(2):
            kb = int(k[b, m])
            torch.testing.assert_close(excl.aggregated[b, m], sam[b, m, ..., :kb].mean(-1))
            torch.testing.assert_close(excl.last_sam[b, m], sam[b, m, ..., kb - 1])
    fixed = forward_statistics(oracle, SCHEDULE, x0, w=1.0, t_max=40, stride=4, fixed_end_step=12)
    assert fixed.end_step.eq(12).all() and fixed.peak_index.equal(k)  # M_te stays the dynamic maximum
    torch.testing.assert_close(fixed.aggregated, sam[..., :4].mean(-1))
    torch.testing.assert_close(fixed.peak_divergence, excl.peak_divergence)


def test_forward_rejects_bad_arguments():
    x0 = images((1, 1, 4, 4), 8)
    net = Net()
    bad = [
        ({"w": -0.5}, InputError, "guidance strength w"),
        ({"w": math.nan}, InputError, "guidance strength w"),
        ({"w": 1.0, "t_max": T + 1}, InputError, "t_max"),
        ({"w": 1.0, "t_max": 0}, InputError, "t_max"),
        ({"w": 1.0, "stride": 0}, InputError, "stride"),
        ({"w": 1.0, "encoding": "ddpm++"}, InputError, "encoding"),
        ({"w": 1.0, "reference": "guided"}, InputError, "reference"),
        ({"w": 1.0, "end": "both"}, InputError, "end"),
        ({"w": 1.0, "t_max": 20, "stride": 3, "fixed_end_step": 4}, InputError, "not on the timestep grid"),
        ({"w": 1.0, "t_max": 20, "fixed_end_step": 20}, InputError, "fixed_end_step"),
        ({"w": 1.0, "healthy_label": -1}, InputError, "healthy_label"),
        ({"w": 1.0, "modalities": [1]}, ValueError, "modalities"),
    ]
    for kwargs, error, words in bad:
        with pytest.raises(error, match=words):
            forward_statistics(net, SCHEDULE, x0, **kwargs)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        forward_statistics(net, SCHEDULE, x0[0], w=1.0)
    with pytest.raises(ModelError, match="shape"):
        forward_statistics(lambda x, t, y: x[:, :, :2], SCHEDULE, x0, w=1.0, t_max=3)
    with pytest.raises(ModelError, match="NaN"):
        forward_statistics(lambda x, t, y: x * math.nan, SCHEDULE, x0, w=1.0, t_max=3)


# -- Algorithm 1 and post-processing -----------------------------------------------------------------------------


def test_algorithm_1_quantile_level():
    q = quantile_range()
    assert q.shape == (101,) and float(q[0]) == pytest.approx(0.98) and float(q[-1]) == pytest.approx(0.90)
    m_max = 2.0
    cases = {2.0: 0.90, 0.0: 0.98, 5.0: 0.90, 1.0: 0.94, 0.588: 0.98 - 0.08 * 0.29, 0.594: 0.98 - 0.08 * 0.30,
             0.25: 0.98 - 0.08 * 0.12,  # M_s = 0.125: round half to even -> index 12
             0.75: 0.98 - 0.08 * 0.38}  # M_s = 0.375 -> index 38
    m_te = torch.tensor(list(cases))
    np.testing.assert_allclose(quantile_level(m_te, m_max).numpy(), list(cases.values()), rtol=0, atol=1e-12)
    # one M_max per modality broadcasts over [B, M]
    np.testing.assert_allclose(quantile_level(torch.tensor([[1.0, 1.0]]), [1.0, 4.0]).numpy(), [[0.90, 0.96]],
                               atol=1e-12)
    np.testing.assert_allclose(quantile_level(torch.tensor([0.5]), 1.0, low=0.8, high=0.99).numpy(), [0.895])
    for m_max_bad in (0.0, -1.0, math.inf):
        with pytest.raises(InputError, match="M_max"):
            quantile_level(torch.tensor([0.1]), m_max_bad)
    with pytest.raises(ValueError, match="per modality"):
        quantile_level(torch.ones(2, 2), [1.0, 2.0, 3.0])
    with pytest.raises(InputError, match="range"):
        quantile_range(0.98, 0.90)


def test_modality_thresholds_match_numpy_quantiles():
    maps = images((2, 2, 9, 7), 9, 0.0, 1.0)
    levels = torch.tensor([[0.9, 0.98], [0.95, 0.5]], dtype=torch.float64)
    got = modality_thresholds(maps, levels)
    want = [[np.quantile(maps[b, m].numpy(), float(levels[b, m])) for m in range(2)] for b in range(2)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    region = torch.zeros(2, 9, 7, dtype=torch.bool)
    region[:, 2:7, 1:5] = True
    got = modality_thresholds(maps, levels, region)
    want = [[np.quantile(maps[b, m, 2:7, 1:5].numpy(), float(levels[b, m])) for m in range(2)] for b in range(2)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    with pytest.raises(ValueError, match="levels"):
        modality_thresholds(maps, levels[:, :1])


def test_median_filter():
    img = images((3, 11, 9), 10)
    expected = np.stack([ndimage.median_filter(p, size=5, mode="mirror") for p in img.numpy()])
    np.testing.assert_array_equal(median_filter(img).numpy(), expected)
    spike = torch.zeros(1, 7, 7)
    spike[0, 3, 3] = 9.0
    assert median_filter(spike).abs().sum() == 0  # an isolated pixel disappears
    block = torch.zeros(12, 12)
    block[2:10, 2:10] = 1.0
    out = median_filter(block)
    expected = block.clone()
    for r, c in [(2, 2), (2, 9), (9, 2), (9, 9)]:  # each corner loses 3 pixels: 9 or 12 of 25 votes are ones
        rr, cc = (r + (1 if r == 2 else -1)), (c + (1 if c == 2 else -1))
        expected[r, c] = expected[rr, c] = expected[r, cc] = 0.0
    torch.testing.assert_close(out, expected)
    with pytest.raises(InputError, match="odd"):
        median_filter(img, 4)


def test_remove_small_components():
    mask = torch.zeros(2, 20, 20, dtype=torch.bool)
    mask[0, 0:5, 0:8] = True  # 40 pixels: removed
    mask[0, 10:15, 10:18] = True
    mask[0, 15, 10] = True  # 41 pixels: kept
    mask[1, 0:3, 0:7] = True  # 21 pixels ...
    mask[1, 3:7, 7:12] = True  # ... + 20 pixels touching only at a corner
    out8 = remove_small_components(mask)
    assert not out8[0, 0:5, 0:8].any() and int(out8[0].sum()) == 41
    assert int(out8[1].sum()) == 41  # 8-connected: one 41-pixel lesion
    out4 = remove_small_components(mask, connectivity=4)
    assert int(out4[1].sum()) == 0  # 4-connected: two small pieces
    assert remove_small_components(mask, max_size=0).equal(mask)
    with pytest.raises(InputError, match="connectivity"):
        remove_small_components(mask, connectivity=6)


def test_segment_hand_made_maps():
    maps = torch.zeros(1, 2, 32, 32, dtype=torch.float64)
    maps[0, 0, 4:12, 4:12], maps[0, 1, 4:12, 4:12] = 1.0, 2.0  # 64-pixel lesion
    maps[0, :, 20:25, 20:25] = torch.tensor([1.0, 2.0])[:, None, None]  # 25 pixels: 13 survive the filter
    maps[0, :, 28:30, 2:4] = 5.0  # a 2x2 speck: removed by the median filter
    # M_te = 0 -> q = 0.98 for both; 89 of 1024 pixels are bright -> Q*_0 = 1, Q*_1 = 2, averaged 1.5 = mean map
    seg = segment(maps, torch.zeros(1, 2), [1.0, 1.0])
    assert seg.rule == "dynamic" and seg.levels.tolist() == [[0.98, 0.98]]
    assert seg.threshold.tolist() == [1.5]
    expected = torch.zeros(1, 32, 32, dtype=torch.bool)
    expected[0, 4:12, 4:12] = True
    for r, c in [(4, 4), (4, 11), (11, 4), (11, 11)]:
        rr, cc = (r + (1 if r == 4 else -1)), (c + (1 if c == 4 else -1))
        expected[0, r, c] = expected[0, rr, c] = expected[0, r, cc] = False
    assert seg.mask.equal(expected)
    assert int(segment(maps, torch.zeros(1, 2), [1.0, 1.0], max_component_size=0).mask.sum()) == 52 + 13
    # ablations: fixed threshold and fixed quantile
    assert not segment(maps, threshold=10.0).mask.any()
    assert segment(maps, quantile=0.5).mask.all()  # Q* = 0: everything; one big component
    with pytest.raises(InputError, match="M_max"):
        segment(maps)
    with pytest.raises(InputError, match="only one"):
        segment(maps, quantile=0.9, threshold=0.1)
    with pytest.raises(ValueError, match="peak_divergence"):
        segment(maps, torch.zeros(2), [1.0, 1.0])


# -- decision ----------------------------------------------------------------------------------------------------


def test_cosine_decision_rule():
    a = torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [3.0, 4.0, 0.0]])
    b = torch.tensor([[2.0, 4.0, 6.0], [0.0, 5.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [4.0, 3.0, 0.0]])
    cos = cosine_similarity(a, b)
    np.testing.assert_allclose(cos.numpy(), [1.0, 0.0, 1.0, 0.0, 24 / 25], atol=1e-15)
    assert is_unhealthy(cos, 0.96).tolist() == [False, True, False, True, True]  # cos == thr_01 -> unhealthy
    # [B, M, n] curves are averaged over modalities first
    a2, b2 = a + torch.tensor([1.0, 0.0, 2.0]), 2 * b + 0.5
    am, bm = ((a + a2) / 2).double().numpy(), ((b + b2) / 2).double().numpy()
    want = (am * bm).sum(1) / np.linalg.norm(am, axis=1) / np.linalg.norm(bm, axis=1)
    got = cosine_similarity(torch.stack([a, a2], dim=1), torch.stack([b, b2], dim=1))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    masks = torch.ones(5, 2, 2, dtype=torch.bool)
    assert mixed_setting_masks(masks, is_unhealthy(cos, 0.96)).sum(dim=(1, 2)).tolist() == [0, 4, 0, 4, 4]
    with pytest.raises(ValueError, match="MSE curves"):
        cosine_similarity(a, b[:, :2])
    with pytest.raises(InputError, match="thr_01"):
        is_unhealthy(cos, 1.5)


def test_peak_divergence_decision_rule():
    cos = torch.tensor([0.99, 0.2, 0.5])
    m_te = torch.tensor([[0.1, 0.3], [0.0, 0.0], [0.4, 0.4]])  # per modality: the mean is thresholded
    np.testing.assert_allclose(decision_values("peak-divergence", cos, m_te).numpy(), [0.2, 0.0, 0.4])
    assert decide("peak-divergence", 0.2, cos, m_te).tolist() == [True, False, True]  # M_te == thr_01 -> unhealthy
    assert decide("cosine", 0.5, cos, m_te).tolist() == [False, True, True]  # the paper's rule, same values
    assert is_unhealthy(torch.tensor([3.0]), 2.5, "peak-divergence").tolist() == [True]  # M_te may exceed 1
    with pytest.raises(InputError, match="M_te"):
        decide("peak-divergence", -0.1, cos, m_te)
    with pytest.raises(InputError, match="decision score"):
        decide("sine", 0.5, cos, m_te)


def test_diffusion_classifier_decision_rule():
    cos, m_te = torch.tensor([0.99, 0.2, 0.5]), torch.tensor([0.1, 0.3, 0.2])
    evidence = torch.tensor([-3e-4, 1e-4, 2e-4], dtype=torch.float64)
    np.testing.assert_array_equal(decision_values("diffusion-classifier", cos, m_te, evidence).numpy(),
                                  evidence.double().numpy())
    # unhealthy at or above thr_01, which may be negative; cosine and M_te play no part
    assert decide("diffusion-classifier", 1e-4, cos, m_te, evidence).tolist() == [False, True, True]
    assert decide("diffusion-classifier", -4e-4, cos, m_te, evidence).tolist() == [True, True, True]
    with pytest.raises(ValueError, match="evidence"):
        decide("diffusion-classifier", 0.0, cos, m_te)


# -- diffusion classifier ------------------------------------------------------------------------------------------


def test_classifier_timesteps_and_noise():
    assert classifier_timesteps(1000) == [50, 100, 150, 200, 250, 300]
    assert classifier_timesteps(10) == [0, 1, 2, 3]  # rounded, without repeats
    noise = classifier_noise((2, 4, 4), 3, seed=5)
    assert noise.shape == (3, 2, 4, 4)
    torch.testing.assert_close(noise, classifier_noise((2, 4, 4), 3, seed=5))
    assert not torch.equal(noise, classifier_noise((2, 4, 4), 3, seed=6))


def test_unhealthy_evidence_is_the_gap_between_the_two_labels_denoising_errors():
    schedule = linear_schedule(100)
    x0 = torch.rand(3, 2, 8, 8) * 2 - 1
    timesteps = [5, 20, 40]
    noise = classifier_noise(x0.shape[1:], len(timesteps), seed=0)
    calls = []

    def oracle(label_that_knows: int, images: torch.Tensor = x0):
        """A network whose label_that_knows predicts the true noise and whose other label predicts zero."""
        def eps_model(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            calls.append((x_t.shape[0], sorted(set(y.tolist()))))
            step = int(t[0])
            clean = torch.cat([images, images])
            abar = schedule.alphas_cumprod[step]
            true_eps = (x_t - abar.sqrt() * clean) / (1 - abar).sqrt()
            return torch.where((y == label_that_knows)[:, None, None, None], true_eps, torch.zeros_like(x_t))
        return eps_model

    # the healthy label's error is E||eps||^2 per timestep, the unhealthy label's 0: the evidence is mean(eps^2)
    evidence = unhealthy_evidence(oracle(1), schedule, x0, healthy_label=0, unhealthy_label=1, timesteps=timesteps,
                                  noise=noise)
    expected = (noise.double() ** 2).mean().item()
    np.testing.assert_allclose(evidence.numpy(), [expected] * 3, rtol=1e-4)
    assert calls == [(6, [0, 1])] * 3  # one call per timestep, both labels in it
    flipped = unhealthy_evidence(oracle(0), schedule, x0, healthy_label=0, unhealthy_label=1, timesteps=timesteps,
                                 noise=noise)
    np.testing.assert_allclose(flipped.numpy(), -evidence.numpy(), rtol=1e-4)
    # a slice's evidence does not depend on its batch (the noise is shared by every slice)
    alone = unhealthy_evidence(oracle(1, x0[1:2]), schedule, x0[1:2], healthy_label=0, unhealthy_label=1,
                               timesteps=timesteps, noise=noise)
    np.testing.assert_allclose(alone.numpy(), evidence.numpy()[1:2], rtol=1e-6)
    with pytest.raises(ValueError, match="noise"):
        unhealthy_evidence(oracle(1), schedule, x0, healthy_label=0, unhealthy_label=1, timesteps=timesteps[:2],
                           noise=noise)
    with pytest.raises(ModelError, match="wrong shape"):
        unhealthy_evidence(lambda x, t, y: x[:1], schedule, x0, healthy_label=0, unhealthy_label=1,
                           timesteps=timesteps, noise=noise)


# -- calibration -------------------------------------------------------------------------------------------------


def brute_force_thr_01(healthy: np.ndarray, unhealthy: np.ndarray) -> tuple[float, int]:
    best_value, best_errors = None, None
    for q in np.linspace(0.005, 0.095, 100):
        thr = np.quantile(healthy, q)
        errors = int(np.sum(unhealthy > thr) + np.sum(healthy <= thr))
        if best_errors is None or errors < best_errors:
            best_value, best_errors = thr, errors
    return best_value, best_errors


def test_calibrate_thr_01_against_brute_force():
    rng = np.random.default_rng(0)
    healthy = 1 - rng.gamma(2.0, 0.01, 300)
    unhealthy = 1 - rng.gamma(2.0, 0.06, 120)
    cos = np.concatenate([healthy, unhealthy])
    labels = np.r_[np.zeros(300, int), np.ones(120, int)]
    order = rng.permutation(cos.size)
    value, record = calibrate_thr_01(torch.from_numpy(cos[order]), torch.from_numpy(labels[order]))
    want, errors = brute_force_thr_01(healthy, unhealthy)
    assert value == pytest.approx(want, rel=1e-12) and record["misclassified"] == errors
    assert record["accuracy"] == pytest.approx(1 - errors / 420)
    assert classification_accuracy(cos[order], labels[order], value) == pytest.approx(record["accuracy"])
    json.dumps(record)


def test_calibrate_thr_01_for_the_peak_divergence_mirrors_the_cosine():
    # M_te = 1 - cos turns "cos <= thr" into "M_te >= 1 - thr": the same slices, the same errors, the mirrored value
    rng = np.random.default_rng(1)
    cos = np.r_[1 - rng.gamma(2.0, 0.01, 200), 1 - rng.gamma(2.0, 0.05, 80)]
    labels = np.r_[np.zeros(200, int), np.ones(80, int)]
    value, record = calibrate_thr_01(1 - cos, labels, "peak-divergence")
    want, errors = brute_force_thr_01(cos[:200], cos[200:])
    assert value == pytest.approx(1 - want, rel=1e-9) and record["misclassified"] == errors
    assert record["score"] == "peak-divergence" and record["rule"].startswith("unhealthy when M_te")
    assert classification_accuracy(1 - cos, labels, value, "peak-divergence") == pytest.approx(record["accuracy"])
    # ties go to the fewest false alarms: the highest quantile of the healthy values
    value, record = calibrate_thr_01([0.0, 0.1, 0.2, 5.0], [0, 0, 0, 1], "peak-divergence")
    assert record["quantile"] == pytest.approx(0.995) and record["misclassified"] == 1  # healthy 0.2 is above all

def test_calibrate_thr_01_ties_and_missing_classes():
    # unhealthy far below every candidate: every candidate misclassifies exactly the healthy slices at or below it;
    # the lowest quantile (fewest such) wins; with equal errors everywhere the first candidate is kept
    healthy = np.linspace(0.9, 1.0, 11)
    value, record = calibrate_thr_01(np.r_[healthy, [0.1, 0.2]], np.r_[np.zeros(11, int), [1, 1]])
    assert value == pytest.approx(np.quantile(healthy, 0.005)) and record["quantile"] == pytest.approx(0.005)
    assert record["misclassified"] == 1  # healthy 0.9 itself is at the threshold (cos <= thr_01)
    value, record = calibrate_thr_01([0.5, 0.5, 0.5, 0.1], [0, 0, 0, 1])  # all candidates equal
    assert value == 0.5 and record["quantile"] == pytest.approx(0.005) and record["misclassified"] == 3
    with pytest.raises(InputError, match="healthy and unhealthy"):
        calibrate_thr_01([0.9, 0.8], [0, 0])
    with pytest.raises(InputError, match="labels"):
        calibrate_thr_01([0.9, 0.8], [0, 2])
    with pytest.raises(InputError, match="NaN"):
        calibrate_thr_01([0.9, math.nan], [0, 1])
    with pytest.raises(ValueError, match="labels"):
        calibrate_thr_01([0.9, 0.8], [0, 1, 1])


def test_calibrate_m_max():
    m_te = torch.tensor([[9.0, 9.0], [1.0, 3.0], [2.0, 0.5], [0.2, 0.1]])
    value, record = calibrate_m_max(m_te, [0, 1, 1, 1])  # the healthy slice's larger values do not count
    assert value == [2.0, 3.0] and record["slice_index"] == [2, 1]
    json.dumps(record)
    assert calibrate_m_max([0.4, 0.7, 0.1], [1, 1, 0])[0] == [0.7]
    with pytest.raises(InputError, match="unhealthy"):
        calibrate_m_max([0.4], [0])
    with pytest.raises(InputError, match="positive"):
        calibrate_m_max([0.0, 0.0], [1, 1])


def test_select_guidance():
    acc = {0.0: 0.90, 1.0: 0.95, 2.0: 0.945, 3.0: 0.93, 5.0: 0.96, 8.0: 0.951, 10.0: 0.80}
    w, record = select_guidance(acc)
    assert w == 8.0 and record["best_w"] == 5.0 and record["best_accuracy"] == 0.96  # 0.951 >= 0.99 * 0.96
    json.dumps(record)
    assert select_guidance({1.0: 1.0, 2.0: 0.99, 3.0: 0.9899})[0] == 2.0  # exactly 99% counts as within
    assert select_guidance({4.0: 0.5})[0] == 4.0
    assert select_guidance({1.0: 0.8, 2.0: 0.8})[0] == 2.0  # ties: the larger w
    for bad in ({}, {-1.0: 0.9}, {1.0: 1.2}, {math.nan: 0.9}):
        with pytest.raises(InputError):
            select_guidance(bad)
