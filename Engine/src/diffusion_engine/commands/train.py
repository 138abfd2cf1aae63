"""``diffusion-engine train METHOD``: train a model from a manifest and write a model folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..manifest import MODALITIES


def _add_half(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--half", action="store_true",
                        help="store the weights as float16 (half the size; inference computes in float32)")


def _add_common(parser: argparse.ArgumentParser, *, steps: int, batch_size: int) -> None:
    parser.add_argument("--manifest", required=True, help="manifest.csv; the 'train' split is used")
    parser.add_argument("--out", required=True, help="model folder to write (safetensors + model.json)")
    parser.add_argument("--preset", default="tiny", help="network size: tiny (CPU), small, paper (GPU)")
    parser.add_argument("--image-size", type=int, default=64, help="model slice size in pixels (default 64)")
    parser.add_argument("--steps", type=int, default=steps, help=f"optimiser steps (default {steps})")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"slices per step (default {batch_size})")
    parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (cosine decay, warm-up)")
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay of the shipped weights")
    parser.add_argument("--warmup-steps", type=int, default=200, help="linear learning-rate warm-up (default 200)")
    parser.add_argument("--checkpoint-every", type=int, default=500,
                        help="optimiser steps between resumable checkpoints in --work-dir (default 500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--work-dir", help="where resumable checkpoints go (default: OUT.training); rerun the same "
                                           "command to resume")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train a model from a manifest",
                                   description="Train a model on the 'train' split of a manifest. Runs resume "
                                               "from the last checkpoint in --work-dir.")
    methods = parser.add_subparsers(dest="method", metavar="METHOD", required=True)
    anomaly = methods.add_parser("anomaly", help="AnoFPDM: class-conditional model with classifier-free guidance",
                                 description="Train AnoFPDM's epsilon model with image-level labels only: a slice "
                                             "is unhealthy if its subject is not healthy and (when a mask is given) "
                                             "the slice holds a lesion voxel. Masks are used for nothing else.")
    _add_common(anomaly, steps=4000, batch_size=32)
    anomaly.add_argument("--modalities", default="flair,t2",
                         help=f"comma-separated modality columns to use, among {', '.join(MODALITIES)}")
    anomaly.add_argument("--score-modalities", default=None,
                         help="comma-separated modalities whose anomaly maps are scored, among --modalities (default: "
                              "all of them); the others are network input only, as the paper's code feeds T1 and T1ce "
                              "but scores FLAIR and T2")
    anomaly.add_argument("--p-uncond", type=float, default=0.1, help="probability of dropping the label (CFG)")
    anomaly.add_argument("--dropout", type=float, default=None,
                         help="dropout in the UNet's residual blocks (default: the preset's; the paper uses 0.1)")
    _add_half(anomaly)
    anomaly.set_defaults(run=run_anomaly)

    aging = methods.add_parser("aging", help="ONLS counterfactual aging: epsilon UNet + noisy age regressor",
                               description="Train ONLS's unconditional epsilon UNet and its age regressor R(x_t, t) "
                                           "(on noisy slices at random noise levels) on the 'train' split, one visit "
                                           "per subject (cross-sectional). Needs the manifest's 'age' column.")
    _add_common(aging, steps=4000, batch_size=16)
    aging.add_argument("--modalities", default="t1",
                       help=f"comma-separated modality columns to use, among {', '.join(MODALITIES)} (default t1)")
    aging.add_argument("--regressor-preset", default="regressor", help="network of the age regressor")
    aging.add_argument("--regressor-steps", type=int, default=None, help="regressor steps (default: --steps)")
    aging.add_argument("--regressor-lr", type=float, default=None, help="regressor learning rate (default: --lr)")
    aging.add_argument("--regressor-low-noise-steps", type=int, default=0,
                       help="first train the regressor this many steps on nearly clean slices (t < T/10), then on "
                            "uniform t (default 0: uniform t only)")
    aging.add_argument("--regressor-batch-size", type=int, default=None,
                       help="regressor slices per step (default: --batch-size)")
    aging.add_argument("--no-regressor-augmentation", dest="regressor_augmentation", action="store_false",
                       help="train the regressor on the slices as they are, without random smooth intensity fields "
                            "(gain and bias field; by default they keep it from reading age from brightness)")
    aging.add_argument("--central-slices", type=int, default=16,
                       help="train on each case's central N brain slices, the slab inference changes (0 = all; "
                            "default 16)")
    _add_half(aging)
    aging.set_defaults(run=run_aging)
    add_restore_parser(methods)


def add_restore_parser(methods: argparse._SubParsersAction) -> None:
    restore = methods.add_parser("restore", help="restoration: denoise, impute or super-resolve (DDPM, CVDM)",
                                 description="Train a restoration model on the clean slices of the 'train' split, "
                                             "degraded on the fly: Rician noise (denoise), dropped voxels/lines/"
                                             "boxes (impute) or in-plane downsampling (superres).")
    _add_common(restore, steps=4000, batch_size=16)
    restore.add_argument("--task", choices=("denoise", "impute", "superres"), required=True)
    restore.add_argument("--method", choices=("ddpm", "conditional", "cvdm", "cvdm-simple", "cvdm-linear"),
                         default="cvdm", help="ddpm: unconditional (noise-level-matched denoising); conditional: "
                                              "degraded slice as input (p_cond for noise); cvdm: learned pixel-wise "
                                              "schedule; cvdm-simple: one global schedule; cvdm-linear: fixed")
    restore.add_argument("--modality", default="t1", help=f"modality column, among {', '.join(MODALITIES)}")
    restore.add_argument("--factors", type=int, nargs="+", default=[2, 4], help="superres factors (2 and/or 4)")
    restore.add_argument("--sigma-range", type=float, nargs=2, default=[0.02, 0.3], metavar=("LOW", "HIGH"),
                         help="denoise: Rician sigma range, in units of the normalised range [-1, 1]")
    restore.add_argument("--temperature", type=float, default=1.0, help="p_cond temperature T_c (paper: 1)")
    restore.add_argument("--crop", type=int, default=None, metavar="PIXELS",
                         help="train on random square crops of this size (with the convolutional preset "
                              "tiny-conv: about 4x faster per step at 32)")
    restore.set_defaults(run=run_restore)


def _settings(args: argparse.Namespace) -> Any:
    from ..devices import resolve_device
    from ..train import TrainSettings

    return TrainSettings(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, ema_decay=args.ema,
                         warmup_steps=args.warmup_steps, checkpoint_every=args.checkpoint_every, seed=args.seed,
                         device=str(resolve_device(args.device)))


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def run_anomaly(args: argparse.Namespace) -> dict[str, str]:
    from ..anomaly.training import train_anomaly_model

    modalities = _names(args.modalities)
    scored = _names(args.score_modalities) if args.score_modalities else None
    out = train_anomaly_model(args.manifest, args.out, modalities=modalities, score_modalities=scored,
                              preset=args.preset,
                              image_size=args.image_size, p_uncond=args.p_uncond, dropout=args.dropout,
                              settings=_settings(args), half_precision=args.half,
                              work_dir=Path(args.work_dir) if args.work_dir else None)
    record_command(out, args)
    return {"model": str(out)}


def command_line(args: argparse.Namespace) -> str:
    """The command as the user typed it (cli.main keeps its argv in ``args.argv``)."""
    import shlex

    return shlex.join(["diffusion-engine", *getattr(args, "argv", [])])


def record_command(model: Path, args: argparse.Namespace) -> None:
    """Add the command that trained ``model`` to its model.json (training section), so it can be rerun."""
    from ..nets.bundle import read_bundle_config, update_bundle_config

    training = read_bundle_config(model).get("training") or {}
    update_bundle_config(model, training={**training, "command": command_line(args)})


def run_restore(args: argparse.Namespace) -> dict[str, str]:
    from ..restore.training import train_restore_model

    out = train_restore_model(args.manifest, args.out, task=args.task, method=args.method, modality=args.modality,
                              preset=args.preset, image_size=args.image_size, factors=args.factors,
                              sigma_range=args.sigma_range, temperature=args.temperature, crop=args.crop,
                              settings=_settings(args), work_dir=Path(args.work_dir) if args.work_dir else None)
    record_command(out, args)
    return {"model": str(out)}


def run_aging(args: argparse.Namespace) -> dict[str, str]:
    import dataclasses

    from ..aging.training import train_aging_model

    modalities = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
    settings = _settings(args)
    regressor = dataclasses.replace(settings, steps=args.regressor_steps or settings.steps,
                                    batch_size=args.regressor_batch_size or settings.batch_size,
                                    learning_rate=args.regressor_lr or settings.learning_rate)
    out = train_aging_model(args.manifest, args.out, modalities=modalities, preset=args.preset,
                            regressor_preset=args.regressor_preset, image_size=args.image_size,
                            central=args.central_slices, settings=settings, regressor_settings=regressor,
                            regressor_low_noise_steps=args.regressor_low_noise_steps,
                            regressor_augmentation=args.regressor_augmentation,
                            work_dir=Path(args.work_dir) if args.work_dir else None, half_precision=args.half,
                            command=command_line(args))
    return {"model": str(out)}
