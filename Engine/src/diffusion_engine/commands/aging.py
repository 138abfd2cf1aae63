"""``diffusion-engine aging``: show a brain at another age with ONLS and write the counterfactual volume(s), the
difference image(s) and a JSON report, all on the input's voxel grid.

Defaults live in aging.pipeline.AgingSettings (options left out here keep them). Nothing is written until
everything is computed, and a failed write removes what this run already wrote.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

COMPOSITIONS = ("age-change", "decoded")  # aging.pipeline.COMPOSITIONS, spelled here so --help needs no torch
SETTING_FLAGS = ("noise_level", "zeta", "guidance_scale", "guidance", "composition", "steps", "central_slices",
                 "variance_slices", "fallback_noise_level", "chunk_size", "device", "precision")
PRECISIONS = ("float32", "bfloat16")  # nets.precision.PRECISIONS, spelled here so --help needs no torch
VARIANCE_SLICES_HELP = ("how many central slices the ONLS variance rule reads (default: the model's slab, the slices "
                        "its regressor learned, even when more are changed; 0 = all changed slices)")
PRECISION_HELP = ("the UNet's compute precision: float32 (default, exact) or bfloat16 (autocast; about 1.4x faster "
                  "on CPUs with AVX-512 BF16 or AMX and on recent GPUs, results differ slightly)")


def _ages(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ages in years, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one age")
    return values


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "aging", help="show a brain MRI at another age (ONLS counterfactual aging)",
        description="Counterfactual brain aging with a generative diffusion model guided by an age regressor "
                    "(ONLS: the noise level is chosen per subject by the regressor's variance over the slices). "
                    "Writes the volume as it would look at the target age, the difference image and an optional "
                    "JSON report, on the exact voxel grid of the input. Research software: not for clinical use.")
    parser.add_argument("--model", default=None,
                        help="model folder (default: the bundled demo model, trained on synthetic phantoms)")
    parser.add_argument("--input", nargs="+", required=True, metavar="IMAGE",
                        help="one image per modality of the model, in its order (the demo model: T1); 'demo': the "
                             "bundled demo case (a phantom T1 at age 65.8 whose real follow-up at 76.1 ships too)")
    parser.add_argument("--age", type=float, default=None,
                        help="the subject's age at this scan, in years (required, except for --input demo)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-age", type=float, help="the age to show, in years")
    target.add_argument("--target-ages", type=_ages, metavar="A,B,...",
                        help="an age sweep: one output per age (OUTPUT gets an _age<A> suffix)")
    parser.add_argument("--output", required=True, metavar="FILE", help="counterfactual volume (.nii.gz, .nrrd)")
    parser.add_argument("--difference", metavar="FILE", help="difference image: counterfactual - input")
    parser.add_argument("--report", metavar="FILE.json",
                        help="JSON report: noise level t0/L and how it was chosen, the variance curve, the "
                             "regressor's age before/after, warnings")
    group = parser.add_argument_group("method (default: the model's calibration, else the paper's values)")
    group.add_argument("--noise-level", type=float, default=None,
                       help="fixed noise level L in (0, 1] instead of ONLS (the paper's baseline)")
    group.add_argument("--zeta", type=float, default=None, help="ONLS variance threshold (paper: 1e-4)")
    group.add_argument("--guidance-scale", type=float, default=None, help="gradient scale c of the regressor guidance")
    group.add_argument("--guidance", choices=("linear", "sqrt"), default=None,
                       help="s_r = y - R (linear, default) or (y - R) sqrt(R) (the paper's algorithm box)")
    group.add_argument("--composition", choices=COMPOSITIONS, default=None,
                       help="age-change: the input plus what the age guidance changed (guided minus unguided "
                            "decoding; keeps the input's detail); decoded: the guided decoding itself, as in the "
                            "paper (default: the model's calibration)")
    group.add_argument("--steps", type=int, default=None, help="DDIM steps over the whole chain (default 100)")
    group.add_argument("--central-slices", type=int, default=None,
                       help="how many central brain slices to change (default: the model's; 0 = all)")
    group.add_argument("--variance-slices", type=int, default=None, help=VARIANCE_SLICES_HELP)
    group.add_argument("--fallback-noise-level", type=float, default=None,
                       help="L used when the variance rule cannot run (too few slices) or never fires (default 0.6)")
    group.add_argument("--chunk-size", type=int, default=None, help="slices per network call (default 64)")
    group.add_argument("--device", default=None, help="auto (GPU if available, the default), cpu, cuda, cuda:1")
    group.add_argument("--precision", choices=PRECISIONS, default=None, help=PRECISION_HELP)
    parser.set_defaults(run=run)


def settings_from_args(args: argparse.Namespace) -> Any:
    from ..aging.pipeline import AgingSettings

    return AgingSettings(**{name: getattr(args, name) for name in SETTING_FLAGS if getattr(args, name) is not None})


def output_paths(output: Path, targets: list[float], sweep: bool) -> list[Path]:
    """One path per target age: OUTPUT itself, or OUTPUT with an _age<A> suffix before the extension for a sweep."""
    if not sweep:
        return [output]
    name = output.name
    suffix = next((s for s in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd") if name.endswith(s)),
                  output.suffix)
    stem = name[: len(name) - len(suffix)] if suffix else name
    return [output.with_name(f"{stem}_age{target:g}{suffix}") for target in targets]


def _model_inputs_and_age(args: argparse.Namespace, device: str) -> tuple[Any, list[str], float]:
    """``--input demo`` means the bundled demo case in the model's modality order (the model is loaded here), and
    its recorded age is the default ``--age``."""
    from ..aging.pipeline import model_spec, resolve_model
    from ..demo import DEMO_WORD, demo_case, demo_description
    from ..errors import InputError

    if args.input == [DEMO_WORD]:
        bundle = resolve_model(args.model, device=device)
        age = demo_description("aging")["age"] if args.age is None else args.age
        return bundle, [str(path) for path in demo_case("aging", model_spec(bundle).modalities).values()], age
    if args.age is None:
        raise InputError("the subject's age at this scan is missing", fix="give it with --age, in years")
    return args.model, args.input, args.age


def run(args: argparse.Namespace) -> dict[str, str]:
    import json

    from ..aging.pipeline import age_counterfactual
    from ..errors import InputError
    from ..fileio import write_text_atomic
    from ..progress import emit
    from ..volume import write_image

    sweep = args.target_ages is not None
    targets = args.target_ages if sweep else [args.target_age]
    images = output_paths(Path(args.output), targets, sweep)
    differences = output_paths(Path(args.difference), targets, sweep) if args.difference else []
    outputs = [*images, *differences, *([Path(args.report)] if args.report else [])]
    settings = settings_from_args(args)
    model, inputs, age = _model_inputs_and_age(args, settings.device)
    sources = {Path(p).resolve() for p in inputs}
    resolved = [p.resolve() for p in outputs]
    if len(set(resolved)) != len(resolved) or sources & set(resolved):
        raise InputError("two outputs share a file name, or an output would overwrite an input",
                         path=", ".join(map(str, outputs)), fix="give --output, --difference and --report new names")
    result = age_counterfactual(model, inputs, age, targets if sweep else targets[0], settings)
    written: list[Path] = []
    try:
        for image, path in zip(result.images, images, strict=True):
            written.append(write_image(image, path))
        for image, path in zip(result.differences, differences, strict=True) if differences else ():
            written.append(write_image(image, path))
        if args.report:
            report = {**result.report, "outputs": {"images": list(map(str, images)),
                                                   "differences": list(map(str, differences))}}
            write_text_atomic(args.report, json.dumps(report, indent=1, allow_nan=False))
            written.append(Path(args.report))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    level = result.report["noise_level"]
    emit("summary", mode=level["mode"], L=level["L"], regressor_age=result.report["regressor_age"])
    ages = result.report["regressor_age"]
    after = ", ".join(f"{a:.1f}" for a in ages["after"])
    print(f"noise level L = {level['L']:.2f} ({level['mode']}); regressor age {ages['before']:.1f} -> {after} years",
          file=sys.stderr)
    labels = [f"_age{t:g}" if sweep else "" for t in targets]
    paths = {f"output{label}": str(p) for label, p in zip(labels, images, strict=True)}
    if differences:
        paths.update({f"difference{label}": str(p) for label, p in zip(labels, differences, strict=True)})
    return paths | ({"report": args.report} if args.report else {})
