"""``diffusion-engine calibrate anomaly|aging|restore``: an anomaly model's guidance strength, decision threshold and
M_max from validation cases with image-level labels; an aging model's guidance scale c from validation longitudinal
pairs; a restoration model's sampling start from clean validation slices. Stored in the model folder's model.json."""

from __future__ import annotations

import argparse
import sys

from .aging import COMPOSITIONS
from .anomaly import DECISION_SCORES, _floats, add_forward_options, add_run_options, settings_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("calibrate", help="calibrate a model on validation cases",
                                   description="Calibrate a model on the 'val' split of a manifest and store the "
                                               "values in the model folder.")
    methods = parser.add_subparsers(dest="method", metavar="METHOD", required=True)
    anomaly = methods.add_parser(
        "anomaly", help="AnoFPDM: guidance strength w, decision threshold thr_01 and M_max",
        description="For each guidance strength of the grid, run the forward process on the validation slices and "
                    "measure how well the healthy/unhealthy decision separates them; keep the largest w within 99% "
                    "of the best accuracy (paper sec. 4.2), with its decision threshold and M_max (Algorithm 1). "
                    "The slice decision is the most accurate on the validation slices of the paper's cosine rule, "
                    "the peak divergence M_te and the diffusion classifier (--decision auto; the cosine on ties), "
                    "or the one given; w comes from the more accurate of the first two. "
                    "Only image-level labels are used: a slice is unhealthy if its subject is not healthy and, when "
                    "the manifest gives a lesion mask, the slice holds a lesion voxel. Run `diffusion-engine "
                    "anomaly` later with the same forward-process options.")
    anomaly.add_argument("--model", required=True, help="model folder to calibrate (its model.json is updated)")
    anomaly.add_argument("--manifest", required=True, help="manifest.csv; the 'val' split is used")
    anomaly.add_argument("--w-grid", type=_floats, default=None,
                         help="comma-separated guidance strengths to try (default 0,1,2,3,5,10,20,30)")
    anomaly.add_argument("--decision", choices=("auto", *DECISION_SCORES), default="auto",
                         help="slice decision score: the paper's cosine, the peak divergence M_te, the diffusion "
                              "classifier, or auto (the most accurate on validation; ties keep the cosine; default)")
    add_forward_options(anomaly)
    add_run_options(anomaly)
    anomaly.set_defaults(run=run_anomaly)

    aging = methods.add_parser(
        "aging", help="ONLS: the variance threshold zeta and the regressor-guidance scale c",
        description="Run ONLS on the 'val' split's longitudinal pairs (baseline towards the follow-up age) with each "
                    "candidate zeta and c > 0; among the pairs whose counterfactuals bring the ventricle volume "
                    "closer to the real follow-ups than the unchanged input does, keep the one closest to the "
                    "follow-ups (largest mean PSNR). `aging` and `evaluate aging` then use them unless --zeta, "
                    "--guidance-scale or --composition is given.")
    aging.add_argument("--model", required=True, help="model folder to calibrate (its model.json is updated)")
    aging.add_argument("--manifest", required=True, help="longitudinal manifest.csv; the 'val' split is used")
    aging.add_argument("--zetas", type=_floats, default=None,
                       help="comma-separated variance thresholds to try (default 1e-4,3e-4,1e-3; 1e-4 is the paper's)")
    aging.add_argument("--scales", type=_floats, default=None,
                       help="comma-separated guidance scales c >= 0 to try (default 30,100,300,1000)")
    aging.add_argument("--subjects", type=int, default=6, help="validation subjects used (default 6; 0 = all)")
    aging.add_argument("--steps", type=int, default=None, help="DDIM steps over the chain (default 100)")
    aging.add_argument("--composition", choices=COMPOSITIONS, default=None,
                       help="the composition c is chosen for (see `aging --help`; default age-change)")
    aging.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    aging.set_defaults(run=run_aging)

    restore = methods.add_parser(
        "restore", help="restoration: where a conditional or CVDM model's sampling chain starts",
        description="Restore degraded 'val' slices (clean ground truth, e.g. a `phantoms --noise-free` cohort) "
                    "with the chain started at each candidate level (1 = from pure noise, as the papers do; "
                    "below 1 = from the degraded image diffused to that level) and store the start with the best "
                    "PSNR inside the head. `restore` then uses it unless --start is given.")
    restore.add_argument("--model", required=True, help="model folder to calibrate (its model.json is updated)")
    restore.add_argument("--manifest", required=True, help="manifest.csv with clean volumes; 'val' split used")
    restore.add_argument("--starts", type=_floats, default=None,
                         help="comma-separated chain starts in (0, 1] (default 0.05,0.1,0.2,0.3,0.5,1)")
    restore.add_argument("--slices", type=int, default=16, help="validation slices (default 16)")
    restore.add_argument("--seed", type=int, default=0)
    restore.set_defaults(run=run_restore)


def run_anomaly(args: argparse.Namespace) -> dict[str, str]:
    from ..anomaly.calibrate import DEFAULT_W_GRID, calibrate_model

    settings = settings_from_args(args, ("t_max", "stride", "encoding", "early_stop", "chunk_size", "device", "seed"))
    values = calibrate_model(args.model, args.manifest, w_grid=args.w_grid or DEFAULT_W_GRID, settings=settings,
                             decision=args.decision)
    record = values["record"]
    accuracy = ", ".join(f"{score} {value:.3f}" for score, value in record["decision"]["accuracy_at_chosen_w"].items())
    print(f"decision {values['decision_score']}, w = {values['w']:g}, thr_01 = {values['thr_01']:.6g}, M_max = "
          f"{', '.join(f'{v:.4g}' for v in values['m_max'])} (validation accuracy: {accuracy}; all healthy "
          f"{record['healthy_slices'] / record['slices']:.3f}; {record['slices']} slices, "
          f"{record['unhealthy_slices']} unhealthy)", file=sys.stderr)
    return {"model": args.model}


def run_aging(args: argparse.Namespace) -> dict[str, str]:
    from ..aging.calibration import DEFAULT_SCALES, DEFAULT_ZETAS, calibrate_onls
    from ..aging.pipeline import DEFAULT_STEPS, AgingSettings

    settings = AgingSettings(steps=args.steps or DEFAULT_STEPS, composition=args.composition,
                             device=args.device).validate()
    record = calibrate_onls(args.model, args.manifest, zetas=args.zetas or DEFAULT_ZETAS,
                            scales=args.scales or DEFAULT_SCALES, settings=settings, max_subjects=args.subjects or None)
    best = record["best"]
    print(f"zeta = {record['zeta']:g}, c = {record['guidance_scale']:g} ({record['composition']}): "
          f"validation PSNR {best['psnr']:.2f} dB "
          f"(identity {record['identity']['psnr']:.2f}), mean L {best['L']:.2f}, rule fired for "
          f"{best['fired_fraction']:.0%} of the subjects", file=sys.stderr)
    return {"model": args.model}


def run_restore(args: argparse.Namespace) -> dict[str, str]:
    from ..restore.calibration import DEFAULT_STARTS, calibrate_start

    record = calibrate_start(args.model, args.manifest, starts=args.starts or DEFAULT_STARTS, slices=args.slices,
                             seed=args.seed)
    scores = ", ".join(f"{start}: {psnr:.2f} dB" for start, psnr in record["psnr_by_start"].items())
    print(f"sampling start {record['value']:g} (validation PSNR by start: {scores})", file=sys.stderr)
    return {"model": args.model}
