"""One figure per restoration evaluation: for each degradation, one slice as clean, degraded and restored by each
method, with the first model's error, uncertainty (per-voxel variance) and, for CVDM, its learned schedule map."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..fileio import atomic_path

MAX_METHODS = 6  # restorations shown per row (baselines first, then models)


def save_restoration_figure(examples: Sequence[tuple[object, list[object], list[object]]], clean: np.ndarray,
                            path: str | os.PathLike[str], *, title: str) -> Path:
    """PNG: one row per degradation (``EvaluationRows.examples``: baselines, then models) on the slice of
    ``clean`` [S, H, W] with the most head; greyscale on [-1, 1]; error, variance and schedule maps with colour bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    index = int(np.argmax((clean > -0.98).reshape(len(clean), -1).sum(axis=1)))
    shown_per_row = max(min(len(c) + len(r), MAX_METHODS) for _, c, r in examples)
    columns = 2 + shown_per_row + 3
    figure = Figure(figsize=(1.7 * columns, 1.9 * len(examples) + 0.4), layout="constrained")
    axes = figure.subplots(len(examples), columns, squeeze=False)
    for row, (case, classical, restored) in zip(axes, examples, strict=True):
        shown = [*classical, *restored]
        panels = [("clean", clean[index]), (case.setting, case.image[index, 0].numpy())]
        panels += [(r.method, r.image[index]) for r in shown[:MAX_METHODS]]
        for axis, (label, image) in zip(row, panels, strict=False):
            axis.imshow(image, cmap="gray", vmin=-1, vmax=1)
            axis.set_title(label, fontsize=6)
        model = next((r for r in restored if r.variance is not None), (restored or shown)[0])
        maps = [(f"|error| {model.method}", np.abs(model.image[index] - clean[index]), "magma")]
        if model.variance is not None:
            maps.append(("variance (uncertainty)", model.variance[index], "magma"))
        if model.schedule is not None:
            maps.append(("learned schedule map", model.schedule[index], "viridis"))
        for axis, (label, image, cmap) in zip(row[2 + shown_per_row:], maps, strict=False):
            shown_image = axis.imshow(image, cmap=cmap)
            figure.colorbar(shown_image, ax=axis, fraction=0.046, pad=0.02).ax.tick_params(labelsize=5)
            axis.set_title(label, fontsize=6)
        for axis in row:
            axis.set_axis_off()
    figure.suptitle(title, fontsize=9)
    path = Path(path)
    with atomic_path(path) as tmp:
        FigureCanvasAgg(figure).print_png(str(tmp))
    return path
