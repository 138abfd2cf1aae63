"""Training AnoFPDM's model: a class-conditional epsilon UNet with classifier-free guidance.

Weak supervision only: every slice carries an image-level label (0 healthy, 1 unhealthy) and nothing else.
The label is replaced by the null label (-1, a zero embedding) with probability ``p_uncond`` so that the same
network also learns the unconditional model that guidance and the forward process need.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from ..datasets import SliceSet, load_slices
from ..errors import InputError
from ..manifest import read_manifest
from ..nets.bundle import save_bundle
from ..nets.presets import build_preset
from ..schedule import Schedule, linear_schedule, q_sample
from ..train import TrainSettings, train
from ..volume import Normalisation
from .forward import NULL_LABEL

LABELS = {"0": "healthy", "1": "unhealthy", "-1": "null (classifier-free guidance)"}


def cfg_loss(schedule: Schedule) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]:
    """Noise-prediction MSE (Ho et al.) on a batch (x0, y, t, noise); y already holds the dropped labels."""

    def loss(network: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x0, y, t, noise = batch
        return torch.nn.functional.mse_loss(network(q_sample(schedule, x0, t, noise), t, y), noise)

    return loss


def balanced_batches(data: SliceSet, batch_size: int, num_timesteps: int, p_uncond: float,
                     device: torch.device) -> Callable[[torch.Generator], tuple[torch.Tensor, ...]]:
    """Half healthy, half unhealthy slices per batch, so the rarer unhealthy class is learned as well."""
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.unhealthy)
    groups = [torch.nonzero(labels == c).flatten() for c in (0, 1)]
    groups = [g for g in groups if len(g)]

    def next_batch(generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        picks = [g[torch.randint(len(g), (batch_size // len(groups) + 1,), generator=generator)] for g in groups]
        index = torch.cat(picks)[torch.randperm(sum(map(len, picks)), generator=generator)][:batch_size]
        y = labels[index].clone()
        y[torch.rand(batch_size, generator=generator) < p_uncond] = NULL_LABEL
        t = torch.randint(num_timesteps, (batch_size,), generator=generator)
        noise = torch.randn(images[index].shape, generator=generator)
        return tuple(v.to(device) for v in (images[index], y, t, noise))

    return next_batch


def train_anomaly_model(manifest: str | Path, out: str | Path, *, modalities: Sequence[str] = ("flair", "t2"),
                        score_modalities: Sequence[str] | None = None, preset: str = "tiny", image_size: int = 64,
                        p_uncond: float = 0.1, dropout: float | None = None, settings: TrainSettings | None = None,
                        work_dir: str | Path | None = None, num_timesteps: int = 1000,
                        half_precision: bool = False) -> Path:
    """Train on the manifest's ``train`` split (image-level labels only) and write a model bundle to ``out``;
    ``half_precision`` stores the weights as float16 (half the size; the loader computes in float32);
    ``score_modalities`` (default: all of ``modalities``) are the channels whose anomaly maps are scored, the others
    are network input only."""
    settings = settings or TrainSettings()
    scored = list(modalities if score_modalities is None else score_modalities)
    if not scored or len(set(scored)) != len(scored) or not set(scored) <= set(modalities):
        raise InputError(f"score modalities {scored} must be distinct and among the modalities {list(modalities)}",
                         fix="name one or more of the training modalities, e.g. flair,t2")
    for what, value, fix in (("label dropout probability", p_uncond, "use e.g. 0.1"),
                             ("network dropout", dropout, "use e.g. 0.1, or leave it to the preset")):
        if value is not None and not 0.0 <= value < 1.0:
            raise InputError(f"{what} {value} must be in [0, 1)", fix=fix)
    table = read_manifest(manifest, require=("healthy",), modalities=modalities)
    rows = table.split("train")
    if not rows:
        raise InputError("no rows with split 'train'", path=table.path, fix="mark the training cases with split=train")
    normalisation = Normalisation("anofpdm")
    data = load_slices(rows, modalities, (image_size, image_size), normalisation, labels=True)
    if data.unhealthy.min() == data.unhealthy.max():
        raise InputError("the training slices are all of one class", path=table.path,
                         fix="include both healthy subjects and subjects with lesions in the train split")
    schedule = linear_schedule(num_timesteps)
    shape = {"image_size": image_size, "in_channels": len(modalities), "out_channels": len(modalities),
             "num_classes": 2}
    if dropout is not None:  # the paper's network uses 0.1; it slows memorising a small training cohort
        shape["dropout"] = dropout
    torch.manual_seed(settings.seed)
    network = build_preset(preset, **shape)
    device = torch.device(settings.device)
    work = Path(work_dir) if work_dir else Path(out).with_name(Path(out).name + ".training")
    network, history = train(network, cfg_loss(schedule),
                             balanced_batches(data, settings.batch_size, num_timesteps, p_uncond, device),
                             settings, work, task="training anomaly model")
    summary = {"manifest": str(Path(manifest).resolve()), "cases": len(rows), "slices": len(data),
               "unhealthy_slices": int(data.unhealthy.sum()), "preset": preset,
               "p_uncond": p_uncond, "settings": asdict(settings),
               "final_loss": history[-1]["loss"] if history else None, "loss_history": history,
               "weights_dtype": "float16" if half_precision else "float32"}
    preprocessing = {"modalities": list(modalities), "image_size": [image_size, image_size],
                     "normalisation": normalisation.to_dict(),
                     **({} if scored == list(modalities) else {"score_modalities": scored})}
    network = network.cpu().half() if half_precision else network.cpu()
    return save_bundle(out, {"eps": network}, kind="anomaly", schedule=schedule, preprocessing=preprocessing,
                       labels={**LABELS, "healthy_label": 0}, training=summary)
