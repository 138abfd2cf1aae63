"""``diffusion-engine restore``: denoise, impute or super-resolve one volume; outputs on the input's voxel grid."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TASKS = ("denoise", "impute", "superres")  # restore.model.TASKS, listed here so that --help needs no torch


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "restore", help="denoise, fill in missing voxels or super-resolve a volume (generative diffusion model)",
        description="Restore one MR volume with a generative diffusion model: denoise (noise-level-matched DDPM, "
                    "conditional DDPM or CVDM), impute missing voxels given a mask, or super-resolve in-plane. "
                    "Several samples give a per-voxel variance (uncertainty) map. Outputs keep the input's exact "
                    "geometry; voxels the model does not see keep their input values. Research software.")
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--model", default="demo",
                        help="restoration model folder (from `train restore`); default: the bundled demo model for "
                             "the task")
    parser.add_argument("--input", required=True, metavar="IMAGE", help="volume to restore")
    parser.add_argument("--output", required=True, metavar="FILE", help="restored volume to write")
    parser.add_argument("--mask", metavar="FILE", help="impute: missing voxels (non-zero), on the input's grid")
    parser.add_argument("--factor", type=int, default=None, help="superres: the in-plane factor the input lost")
    parser.add_argument("--uncertainty", metavar="FILE", help="per-voxel variance over --samples draws")
    parser.add_argument("--schedule-map", metavar="FILE", help="CVDM: the learned pixel-wise schedule magnitude")
    parser.add_argument("--report", metavar="FILE.json", help="JSON report (estimated sigma, entry timestep, ...)")
    parser.add_argument("--samples", type=int, default=1, help="draws to average (>= 2 for --uncertainty)")
    parser.add_argument("--sigma", type=float, default=None, help="denoise: known noise sigma in input units")
    parser.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim",
                        help="matched denoising: deterministic DDIM (default) or stochastic DDPM steps")
    parser.add_argument("--cycles", type=int, default=1, help="matched denoising: repeated passes")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (CVDM uses 200 ancestral steps)")
    parser.add_argument("--start", type=float, default=None, metavar="FRACTION",
                        help="conditional/CVDM: where the sampling chain starts, in (0, 1]; 1 = from pure noise "
                             "(the papers); default: the model's calibrated start (`calibrate restore`), and for a "
                             "conditional denoiser the step matching the input's noise")
    parser.add_argument("--plane", choices=("auto", "axial", "coronal", "sagittal"), default="auto",
                        help="slicing plane of the 2D model; auto: axial, or coronal when the mask removes whole "
                             "axial slices (each becomes a missing row of every coronal slice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda, ...")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict[str, str]:
    from ..devices import resolve_device
    from ..errors import InputError
    from ..fileio import write_text_atomic
    from ..restore.model import load_restore_model
    from ..restore.pipeline import RestoreSettings, restore_volume
    from ..volume import write_image

    if args.uncertainty and args.samples < 2:
        raise InputError("an uncertainty map needs at least 2 samples", fix="pass --samples 2 or more")
    model = load_restore_model(args.model, task=args.task, device=str(resolve_device(args.device)))
    if args.schedule_map and not model.has_schedule_map:
        raise InputError("only CVDM models with a pixel-wise schedule have a learned schedule map",
                         path=model.path, fix="leave out --schedule-map")
    settings = RestoreSettings(samples=args.samples, sampler=args.sampler, cycles=args.cycles, steps=args.steps,
                               factor=args.factor, sigma=args.sigma, seed=args.seed, start=args.start, plane=args.plane,
                               device=str(resolve_device(args.device)))
    result = restore_volume(model, args.input, args.task, settings=settings, mask=args.mask)
    outputs = {"output": str(write_image(result.image, args.output))}
    if args.uncertainty and result.uncertainty is not None:
        outputs["uncertainty"] = str(write_image(result.uncertainty, args.uncertainty))
    if args.schedule_map:
        outputs["schedule_map"] = str(write_image(result.schedule_map, args.schedule_map))
    if args.report:
        write_text_atomic(Path(args.report), json.dumps(result.report, indent=1, default=str))
        outputs["report"] = args.report
    return outputs
