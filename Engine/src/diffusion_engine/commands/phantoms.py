"""``diffusion-engine phantoms anomaly|aging``: synthetic cohorts on real (MNI152) anatomy, with ground truth."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Make a cohort of synthetic brain MR volumes with ground truth, built on the MNI152 2009 template that ships
with nilearn (pip install "diffusion-engine[phantoms]"). Every subject has its own shape, pose, tissue
contrast, bias field and noise; the output folder holds NIfTI files, manifest.csv and montage.png.

  anomaly   FLAIR, T2, T1 and a lesion mask per subject (tumour-like and stroke-like lesions);
            about half the subjects healthy. --difficulty hard lowers the lesion contrast and adds bright
            non-lesion artefacts (vessels, flow streaks, periventricular caps, choroid plexus, bias).
  aging     T1, FLAIR and a lateral-ventricle mask per subject at a baseline age and a follow-up age:
            ventricles enlarge, the cortex thins and white-matter hyperintensities grow with age.

--noise-free leaves out the scanner noise: clean ground truth for restoration (degrade it, restore, compare).
The folder is written in full or not at all (a failure or a cancel leaves nothing behind).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("phantoms", help="make synthetic cohorts with ground truth (MNI152 anatomy)",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = parser.add_subparsers(dest="cohort", metavar="KIND", required=True)

    anomaly = kinds.add_parser("anomaly", help="subjects with and without lesions (anomaly segmentation)",
                               description="FLAIR, T2, T1 and a lesion mask per subject; about half healthy.")
    _common_arguments(anomaly)
    anomaly.add_argument("--healthy-fraction", type=float, default=0.5, metavar="F",
                         help="fraction of healthy subjects (default 0.5)")
    anomaly.add_argument("--difficulty", default="standard", metavar="{standard,hard,mixed}",
                         help="hard: lesions closer to normal tissue and bright non-lesion artefacts; mixed: "
                              "every other subject hard (default standard)")
    anomaly.set_defaults(run=run_anomaly)

    aging = kinds.add_parser("aging", help="every subject at two ages (counterfactual aging)",
                             description="T1, FLAIR and a ventricle mask per subject at a baseline and a "
                                         "follow-up age.")
    _common_arguments(aging)
    aging.add_argument("--min-gap", type=float, default=2.0, metavar="YEARS",
                       help="shortest baseline-to-follow-up gap (default 2)")
    aging.add_argument("--max-gap", type=float, default=12.0, metavar="YEARS",
                       help="longest gap (default 12)")
    aging.add_argument("--age-range", default="55,85", metavar="LOW,HIGH",
                       help="ages of all visits, within 40-100 years (default 55,85)")
    aging.set_defaults(run=run_aging)


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (new or empty)")
    parser.add_argument("--subjects", type=int, default=40, help="number of subjects, at least 3 (default 40)")
    parser.add_argument("--spacing", type=float, default=2.0, metavar="MM",
                        help="isotropic voxel size in mm, 1-4 (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same cohort (default 0)")
    parser.add_argument("--split", default="0.6,0.2,0.2", metavar="TRAIN,VAL,TEST",
                        help="fractions of subjects per split (default 0.6,0.2,0.2)")
    parser.add_argument("--noise-free", action="store_true",
                        help="no scanner noise (clean ground truth for restoration evaluation)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier cohort in --out")


def _outputs(manifest: object) -> dict[str, str]:
    from pathlib import Path

    folder = Path(str(manifest)).parent
    return {"manifest": str(manifest), "montage": str(folder / "montage.png"), "folder": str(folder)}


def run_anomaly(args: argparse.Namespace) -> dict[str, str]:
    from ..phantoms import make_anomaly_cohort

    manifest = make_anomaly_cohort(args.out, args.subjects, args.spacing, args.seed,
                                   healthy_fraction=args.healthy_fraction, difficulty=args.difficulty,
                                   split=args.split, overwrite=args.overwrite, noise_free=args.noise_free)
    return _outputs(manifest)


def run_aging(args: argparse.Namespace) -> dict[str, str]:
    from ..phantoms import make_aging_cohort

    manifest = make_aging_cohort(args.out, args.subjects, args.spacing, args.seed, min_gap=args.min_gap,
                                 max_gap=args.max_gap, age_range=args.age_range, split=args.split,
                                 overwrite=args.overwrite, noise_free=args.noise_free)
    return _outputs(manifest)
