"""A one-look summary of a segmentation: axial slices with the anomaly map and the lesion outline, and M_t curves."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..fileio import atomic_path
from ..volume.geometry import canonical_array

SLICES_SHOWN = 4
DISPLAY_PERCENTILE = 99.5


def _levels(label: np.ndarray, score: np.ndarray, count: int) -> list[int]:
    """Canonical axial levels to show: the ones with the most lesion, else the highest anomaly scores, in order."""
    per_level = label.reshape(len(label), -1).sum(axis=1)
    if not per_level.any():
        per_level = score.reshape(len(score), -1).max(axis=1)
    return sorted(int(i) for i in np.argsort(per_level)[::-1][:count])


def save_anomaly_figure(image: sitk.Image, result: object, path: str | os.PathLike[str]) -> Path:
    """PNG of ``image`` (the first input) with ``result.score_map`` and ``result.label`` (an AnomalyResult) on a
    few axial slices, radiological display, and each slice's divergence curve M_t coloured by its decision."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    anatomy, label, score = (canonical_array(img)[0] for img in (image, result.label, result.score_map))
    levels = _levels(label, score, SLICES_SHOWN)
    top = float(np.percentile(anatomy[anatomy > 0], DISPLAY_PERCENTILE)) if (anatomy > 0).any() else 1.0
    score_top = float(score.max()) or 1.0
    figure = Figure(figsize=(3.0 * len(levels), 6.2), layout="constrained")
    grid = figure.add_gridspec(2, len(levels), height_ratios=(3, 2))
    for column, level in enumerate(levels):
        axis = figure.add_subplot(grid[0, column])
        axis.imshow(anatomy[level], cmap="gray", vmin=0, vmax=top)
        axis.imshow(np.ma.masked_less_equal(score[level], 0.25 * score_top), cmap="inferno", vmin=0,
                    vmax=score_top, alpha=0.6)
        if label[level].any():
            axis.contour(label[level], levels=[0.5], colors="cyan", linewidths=0.8)
        axis.set_title(f"axial slice {level}: {int(label[level].sum())} lesion voxels", fontsize=8)
        axis.set_axis_off()
    curves = figure.add_subplot(grid[1, :])
    report = result.report
    timesteps = report["curves"]["timesteps"]
    for row, curve in zip(report["slices"], report["curves"]["m_t"], strict=True):
        curves.plot(timesteps, curve, color="tab:red" if row["unhealthy"] else "tab:blue", alpha=0.35, linewidth=0.7)
    curves.plot([], [], color="tab:red", label="slices called unhealthy")
    curves.plot([], [], color="tab:blue", label="slices called healthy")
    curves.set_xlabel("noise level t")
    curves.set_ylabel("M_t (guided vs unguided)")
    curves.legend(fontsize=8, loc="upper left")
    figure.suptitle(f"AnoFPDM: lesion volume {report['lesion_volume_ml']:.1f} mL, {report['unhealthy_slices']} of "
                    f"{len(report['slices'])} brain slices unhealthy (cyan: lesion; overlay: anomaly map)", fontsize=9)
    path = Path(path)
    with atomic_path(path) as tmp:
        FigureCanvasAgg(figure).print_png(str(tmp))
    return path
