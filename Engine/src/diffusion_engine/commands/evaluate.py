"""``diffusion-engine evaluate METHOD``: score a model on a manifest split and write a results table and figure."""

from __future__ import annotations

import argparse
from pathlib import Path

from .aging import COMPOSITIONS, PRECISION_HELP, PRECISIONS, VARIANCE_SLICES_HELP
from .anomaly import DECISION_SCORES

VARIANT_KEYS = ("anofpdm", "anofpdm_ddpm", "last_sam", "fixed_noise", "fixed_threshold", "reconstruction",
                "intensity")  # anomaly.evaluate.VARIANTS, listed here so that --help needs no torch


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help="score a model on a manifest split (results table + figure)",
                                   description="Evaluate a model on the cases of one manifest split against their "
                                               "ground-truth masks and write results.md, results.json and "
                                               "figure.png.")
    methods = parser.add_subparsers(dest="method", metavar="METHOD", required=True)
    anomaly = methods.add_parser(
        "anomaly", help="AnoFPDM, its variants and two baselines, with the paper's Table 1 metrics",
        description="AnoFPDM (DDIM), AnoFPDM (DDPM), the S_te-only map, fixed noise scale and fixed threshold "
                    "ablations, a DDIM classifier-free reconstruction baseline and a FLAIR intensity baseline. Dice, "
                    "IoU and AUPRC in the 'mixed' and 'unhealthy' settings, slice accuracy and per-case Dice. The "
                    "masks of the evaluated split are used for scoring only; the baselines choose their threshold "
                    "with the masks of the validation split (AnoFPDM uses no pixel label).")
    anomaly.add_argument("--model", default=None, help="model folder (calibrated); default: the bundled demo model")
    anomaly.add_argument("--manifest", required=True, help="manifest.csv with lesion masks for the evaluated cases")
    anomaly.add_argument("--split", default="test", help="split to evaluate (default test)")
    anomaly.add_argument("--val-split", default="val", help="split the baselines tune their threshold on (default val)")
    anomaly.add_argument("--out", default=None, help="output folder (default: ./evaluation-anomaly-SPLIT)")
    anomaly.add_argument("--variants", nargs="+", choices=VARIANT_KEYS, metavar="VARIANT",
                         help=f"methods to run (default all): {', '.join(VARIANT_KEYS)}")
    anomaly.add_argument("--stride", type=int, default=None,
                         help="AnoFPDM timestep stride (default: the calibration's, else 40)")
    anomaly.add_argument("--t-max", type=int, default=None, help="AnoFPDM forward steps (default: the calibration's, "
                                                                 "else 0.6 T)")
    anomaly.add_argument("--w", type=float, default=None, help="guidance strength (default: calibrated)")
    anomaly.add_argument("--decision-score", choices=DECISION_SCORES, default=None,
                         help="slice decision of the mixed setting (default: calibrated)")
    anomaly.add_argument("--thr-01", type=float, default=None, help="decision threshold (default: calibrated)")
    anomaly.add_argument("--m-max", type=float, nargs="+", default=None, help="Algorithm 1's M_max (default: "
                                                                              "calibrated)")
    anomaly.add_argument("--fixed-noise-scale", type=int, default=None,
                         help="t_e of the fixed-noise ablation (default: median t_e of AnoFPDM on the split)")
    anomaly.add_argument("--fixed-threshold", type=float, default=None,
                         help="threshold of the fixed-threshold ablation (default: median Q* of AnoFPDM on the split)")
    anomaly.add_argument("--reconstruction-noise-level", type=int, default=None,
                         help="noise level L of the reconstruction baseline (default: calibration, else 0.5 T)")
    anomaly.add_argument("--reconstruction-w", type=float, default=None,
                         help="guidance strength of the reconstruction baseline (default: AnoFPDM's w)")
    anomaly.add_argument("--reconstruction-stride", type=int, default=None,
                         help="DDIM stride of the reconstruction baseline (default 10)")
    anomaly.add_argument("--chunk-size", type=int, default=64, help="slices per network batch (default 64)")
    anomaly.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda, cuda:1, ...")
    anomaly.add_argument("--seed", type=int, default=0, help="seed of the DDPM encoding noise")
    anomaly.add_argument("--no-figure", action="store_true", help="skip figure.png")
    anomaly.set_defaults(run=run_anomaly)

    aging = methods.add_parser(
        "aging", help="ONLS vs fixed noise levels and the identity baseline on longitudinal pairs (paper Table 2)",
        description="For every subject of the split with two visits: the counterfactual of the first visit at the "
                    "age of the last, by ONLS and by each fixed noise level L, and the identity baseline, against "
                    "the real last visit: SSIM (window 11), MSE, PSNR, ventricle volume error and the regressor's "
                    "age error; plus an age sweep whose ventricle volume should rise monotonically.")
    aging.add_argument("--model", default=None, help="aging model folder; default: the bundled demo model")
    aging.add_argument("--manifest", required=True, help="longitudinal manifest (age, visit, ventricles columns)")
    aging.add_argument("--split", default="test", help="split to evaluate (default test)")
    aging.add_argument("--out", default=None, help="output folder (default: ./evaluation-aging-SPLIT)")
    aging.add_argument("--noise-levels", default="1.0,0.9,0.8,0.7,0.6,0.5,0.4",
                       help="fixed noise levels L to compare with ONLS (comma-separated; empty for none)")
    aging.add_argument("--guidance-scales", default=None,
                       help="gradient scale(s) c, comma-separated (default: the model's calibrated c)")
    aging.add_argument("--zeta", type=float, default=None, help="ONLS variance threshold (default: calibrated, 1e-4)")
    aging.add_argument("--steps", type=int, default=None, help="DDIM steps over the chain (default 100)")
    aging.add_argument("--composition", choices=COMPOSITIONS, default=None,
                       help="how counterfactuals are composed (see `aging --help`; default: the model's calibration)")
    aging.add_argument("--sweep", default="-10,-5,5,10,15",
                       help="age sweep offsets in years around the baseline age, written --sweep=-10,-5,5 "
                            "(empty for none)")
    aging.add_argument("--central-slices", type=int, default=None,
                       help="central brain slices evaluated per subject (default: the model's; 0 = all)")
    aging.add_argument("--variance-slices", type=int, default=None, help=VARIANCE_SLICES_HELP)
    aging.add_argument("--max-subjects", type=int, default=None, help="evaluate only the first N subjects")
    aging.add_argument("--precision", choices=PRECISIONS, default=None, help=PRECISION_HELP)
    aging.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda, cuda:1, ...")
    aging.add_argument("--no-figure", action="store_true", help="skip figure.png")
    aging.set_defaults(run=run_aging)
    add_restore_parser(methods)


def add_restore_parser(methods: argparse._SubParsersAction) -> None:
    restore = methods.add_parser(
        "restore", help="restoration models vs classical baselines on degraded held-out slices (PSNR, SSIM, ...)",
        description="Degrade clean held-out slices (a `phantoms --noise-free` cohort): Rician noise at several "
                    "levels, dropped voxels/rows/a square, in-plane downsampling; restore them with every model "
                    "given and with the classical baselines (non-local means, total variation, biharmonic "
                    "inpainting, bilinear/bicubic interpolation); score PSNR, SSIM, MS-SSIM, MAE and rank the "
                    "uncertainty maps against the error. Writes results.md/json and a figure per task.")
    restore.add_argument("--models", required=True, nargs="+", metavar="MODEL",
                         help="restoration model folders (any tasks and methods; one modality and slice size)")
    restore.add_argument("--manifest", required=True, help="cohort with clean volumes (phantoms --noise-free)")
    restore.add_argument("--split", default="test")
    restore.add_argument("--sigmas", type=float, nargs="+", default=[0.05, 0.1, 0.2],
                         help="denoise: Rician noise levels in normalised units (range [-1, 1])")
    restore.add_argument("--slices", type=int, default=24, help="held-out slices to score (default 24)")
    restore.add_argument("--samples", type=int, default=4,
                         help="draws per conditional/CVDM restoration: the mean is scored, the variance ranked")
    restore.add_argument("--steps", type=int, default=50, help="DDIM steps (conditional; after the matched entry)")
    restore.add_argument("--cvdm-steps", type=int, default=200, help="CVDM ancestral sampling steps")
    restore.add_argument("--out", default=None, help="output folder (default ./evaluation-restore-SPLIT)")
    restore.add_argument("--no-figure", action="store_true", help="skip the PNG figures")
    restore.add_argument("--seed", type=int, default=0)
    restore.set_defaults(run=run_restore)


def run_restore(args: argparse.Namespace) -> dict[str, str]:
    from ..errors import InputError
    from ..restore.evaluate import EvaluationSettings, run_evaluation, write_evaluation
    from ..restore.model import load_restore_model

    models = {Path(path).name: load_restore_model(path) for path in args.models}
    if len(models) != len(args.models):
        raise InputError("two models share a folder name", fix="give each model folder its own name")
    if args.samples < 1 or args.steps < 1 or args.cvdm_steps < 1 or args.slices < 1:
        raise InputError("--samples, --steps, --cvdm-steps and --slices must be at least 1", fix="pass positive counts")
    settings = EvaluationSettings(sigmas=tuple(args.sigmas), samples=args.samples, steps=args.steps,
                                  cvdm_steps=args.cvdm_steps, seed=args.seed)
    results, clean = run_evaluation(models, args.manifest, split=args.split, slices=args.slices, settings=settings)
    out = Path(args.out) if args.out else Path.cwd() / f"evaluation-restore-{args.split}"
    return write_evaluation(results, clean, out, command=command_text(args), figure=not args.no_figure)


def run_anomaly(args: argparse.Namespace) -> dict[str, str]:
    from ..anomaly.evaluate import default_settings, run_evaluation, write_evaluation
    from ..anomaly.pipeline import resolve_model

    bundle = resolve_model(args.model, device=args.device)
    m_max = args.m_max[0] if args.m_max and len(args.m_max) == 1 else args.m_max
    settings = default_settings(bundle, stride=args.stride, t_max=args.t_max, w=args.w, thr_01=args.thr_01,
                                decision_score=args.decision_score, m_max=m_max, chunk_size=args.chunk_size,
                                device=args.device, seed=args.seed)
    evaluation = run_evaluation(bundle, args.manifest, split=args.split, val_split=args.val_split,
                                variants=args.variants, settings=settings,
                                reconstruction={"noise_level": args.reconstruction_noise_level,
                                                "w": args.reconstruction_w, "stride": args.reconstruction_stride},
                                fixed_noise_scale=args.fixed_noise_scale, fixed_threshold=args.fixed_threshold)
    out = Path(args.out) if args.out else Path.cwd() / f"evaluation-anomaly-{args.split}"
    return write_evaluation(evaluation, out, command=command_text(args), figure=not args.no_figure)


def _numbers(text: str | None) -> list[float]:
    from ..errors import InputError

    try:
        return [float(v) for v in (text or "").split(",") if v.strip()]
    except ValueError:
        raise InputError(f"expected comma-separated numbers, got {text!r}", fix="e.g. 1.0,0.8,0.6") from None


def run_aging(args: argparse.Namespace) -> dict[str, str]:
    from ..aging.evaluate import run_evaluation, write_evaluation
    from ..aging.pipeline import AgingSettings, resolve_model

    bundle = resolve_model(args.model, device=args.device)
    given = {"zeta": args.zeta, "steps": args.steps, "composition": args.composition, "precision": args.precision,
             "central_slices": args.central_slices, "variance_slices": args.variance_slices}
    settings = AgingSettings(device=args.device, **{k: v for k, v in given.items() if v is not None})
    evaluation = run_evaluation(bundle, args.manifest, split=args.split, settings=settings,
                                levels=_numbers(args.noise_levels), scales=_numbers(args.guidance_scales) or None,
                                sweep=_numbers(args.sweep), max_subjects=args.max_subjects)
    out = Path(args.out) if args.out else Path.cwd() / f"evaluation-aging-{args.split}"
    return write_evaluation(evaluation, out, command=command_text(args), figure=not args.no_figure)


def command_text(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (every option that was set), for the report."""
    import shlex

    words = ["diffusion-engine", "evaluate", args.method]
    for name, value in vars(args).items():
        if name in ("run", "command", "method", "progress", "cancel_file", "argv") or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, str) and value.startswith("-"):
            words.append(f"{flag}={value}")  # e.g. --sweep=-10,-5: a separate word would parse as an option
            continue
        words.append(flag)
        if value is not True:
            words += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return " ".join(shlex.quote(word) for word in words)
