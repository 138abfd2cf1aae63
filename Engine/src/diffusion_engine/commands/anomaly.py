"""``diffusion-engine anomaly``: segment lesions in one case with AnoFPDM and write a label map, an anomaly map and
a JSON report, all on the input's voxel grid.

Defaults live in anomaly.pipeline.AnomalySettings (options left out here keep them); the numbers quoted in the help
are checked against them by the tests. Nothing is written until everything is computed, and a failed write removes
what this run already wrote.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# anomaly.decision.DECISION_SCORES, spelled here so --help needs no torch
DECISION_SCORES = ("cosine", "peak-divergence", "diffusion-classifier")

FAST_STRIDE = 60
ACCURATE_STRIDE = 1


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_forward_options(parser: argparse.ArgumentParser) -> None:
    """Options that change the forward pass, shared with `calibrate anomaly` (calibrate and run with the same)."""
    group = parser.add_argument_group("forward process (calibrate and segment with the same values)")
    speed = group.add_mutually_exclusive_group()
    speed.add_argument("--stride", type=int, default=None,
                       help="use every N-th noise level of the forward process (default 40: 15 levels). Smaller is "
                            "slower and closer to the published method; 1 is the paper's full grid")
    speed.add_argument("--fast", dest="stride", action="store_const", const=FAST_STRIDE,
                       help=f"same as --stride {FAST_STRIDE}: 10 noise levels, about a third faster than the default")
    speed.add_argument("--accurate", dest="stride", action="store_const", const=ACCURATE_STRIDE,
                       help="same as --stride 1: the paper's full grid, about 40 times slower (meant for a GPU)")
    group.add_argument("--t-max", type=int, default=None,
                       help="highest noise level explored, in model timesteps (default: 60%% of the model's "
                            "timesteps, 600 of 1000, as the authors' code)")
    group.add_argument("--encoding", choices=("ddim", "ddpm"), default=None,
                       help="how the image is noised: ddim = deterministic (default, the paper's best), "
                            "ddpm = random noise (results vary with --seed)")
    group.add_argument("--early-stop", action="store_true", default=None,
                       help="stop a slice once its guided/unguided divergence has clearly passed its peak (faster; "
                            "the model must have been calibrated with --early-stop too)")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("computation")
    group.add_argument("--device", default=None, help="auto (GPU if available, the default), cpu, cuda, cuda:1")
    group.add_argument("--chunk-size", type=int, default=None,
                       help="slices processed together (default 64); halved automatically when memory runs out")
    group.add_argument("--seed", type=int, default=None, help="random seed for --encoding ddpm (default 0)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "anomaly", help="segment lesions in a brain MRI (AnoFPDM)",
        description="Find lesions (e.g. tumours, white-matter hyperintensities) as the regions a generative "
                    "diffusion model, guided towards 'healthy', would change. Writes a lesion label map, an "
                    "anomaly score map and an optional JSON report, on the exact voxel grid of the first input. "
                    "Slices the model calls healthy get no lesion. Research software: not for clinical use.")
    parser.add_argument("--model", default=None,
                        help="model folder (default: the bundled demo model, trained on synthetic phantoms)")
    parser.add_argument("--input", nargs="+", required=True, metavar="IMAGE",
                        help="one image per modality of the model, in its order (e.g. FLAIR.nii.gz T2.nii.gz); "
                             "all on the same voxel grid. 'demo': the bundled demo case (a phantom with a tumour)")
    parser.add_argument("--output-label", required=True, metavar="FILE",
                        help="lesion label map to write (.nrrd, .nii.gz, .mha): 1 = lesion, 0 = background")
    parser.add_argument("--output-map", metavar="FILE", help="anomaly score map to write (higher = more abnormal)")
    parser.add_argument("--report", metavar="FILE.json",
                        help="JSON report: per slice noise level t_e, threshold, healthy/unhealthy decision, "
                             "divergence curve; lesion volume in mL")
    parser.add_argument("--figure", metavar="FILE.png",
                        help="picture to look at: the slices with the most lesion (anomaly map and lesion outline "
                             "over the first input) and every slice's divergence curve")

    values = parser.add_argument_group("calibrated values (default: those stored in the model by `diffusion-engine "
                                       "calibrate anomaly`)")
    values.add_argument("--w", type=float, default=None,
                        help="guidance strength: how strongly the model is pushed towards 'healthy' (paper: 2 on "
                             "BraTS, 30 on ATLAS)")
    values.add_argument("--decision-score", choices=DECISION_SCORES, default=None,
                        help="what decides whether a slice holds a lesion: the paper's cosine similarity of the "
                             "error curves, the peak divergence M_te, or the diffusion classifier (does the model's "
                             "'unhealthy' or 'healthy' condition denoise the slice better; 12 more network "
                             "evaluations per slice) (default: the one calibrated)")
    values.add_argument("--thr-01", type=float, default=None,
                        help="decision threshold: with the cosine, slices at or below it (-1 to 1) are called "
                             "unhealthy; with the other scores, slices at or above it")
    values.add_argument("--m-max", type=_floats, default=None,
                        help="largest divergence seen on lesion slices, one value or one per modality "
                             "(comma-separated); scales the per-slice threshold")

    masks = parser.add_argument_group("segmentation")
    masks.add_argument("--threshold", type=float, default=None,
                       help="fixed threshold on the anomaly map instead of the adaptive per-slice one")
    masks.add_argument("--quantile", type=float, default=None,
                       help="fixed quantile (0-1) of each slice's anomaly map as threshold, instead of the adaptive "
                            "one (the paper's adaptive range is 0.90-0.98)")
    masks.add_argument("--noise-scale", type=int, default=None,
                       help="fixed noise level (a timestep on the --stride grid) up to which the anomaly map is "
                            "averaged, instead of each slice's own t_e")
    masks.add_argument("--aggregation", choices=("mean", "last"), default=None,
                       help="anomaly map: mean over noise levels up to t_e (default) or the map at t_e only")
    masks.add_argument("--no-decision", dest="decision", action="store_false", default=None,
                       help="keep lesions on every slice, also on slices the model calls healthy")
    masks.add_argument("--min-component-mm2", type=float, default=None,
                       help="remove lesion islands of at most this area per slice (default 140.625 mm2: the "
                            "authors' 40 pixels of 1.875 mm)")
    masks.add_argument("--median-size", type=int, default=None,
                       help="median filter of the anomaly map, in model pixels (odd; default 5; 1 = none)")
    add_forward_options(parser)
    add_run_options(parser)
    parser.set_defaults(run=run)


SETTING_FLAGS = ("w", "t_max", "stride", "encoding", "aggregation", "noise_scale", "threshold", "quantile",
                 "decision", "decision_score", "thr_01", "m_max", "min_component_mm2", "median_size", "early_stop",
                 "chunk_size", "device", "seed")


def settings_from_args(args: argparse.Namespace, names: tuple[str, ...] = SETTING_FLAGS) -> Any:
    """AnomalySettings from the options given; options left out keep the API's defaults."""
    from ..anomaly.pipeline import AnomalySettings

    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return AnomalySettings(**given)


def _check_outputs(inputs: list[str], outputs: list[Path]) -> None:
    from ..errors import InputError

    resolved = [p.resolve() for p in outputs]
    if len(set(resolved)) != len(resolved):
        raise InputError("two outputs have the same file name", path=", ".join(map(str, outputs)),
                         fix="give --output-label, --output-map, --report and --figure different names")
    sources = {Path(p).resolve() for p in inputs}
    for path, full in zip(outputs, resolved, strict=True):
        if full in sources:
            raise InputError("an output would overwrite an input image", path=path, fix="choose another output name")


def write_outputs(result: Any, label: Path, score_map: Path | None, report: Path | None,
                  figure: tuple[Path, Any] | None = None) -> dict[str, str]:
    """Write every output or none: a failure (or a cancel) removes the files this call already wrote.
    ``figure`` is (PNG path, the first input image)."""
    import json

    from ..anomaly.figure import save_anomaly_figure
    from ..fileio import write_text_atomic
    from ..volume import write_image

    written: list[Path] = []
    try:
        if figure is not None:
            save_anomaly_figure(figure[1], result, figure[0])
            written.append(figure[0])
        write_image(result.label, label)
        written.append(label)
        if score_map is not None:
            write_image(result.score_map, score_map)
            written.append(score_map)
        if report is not None:
            outputs = {"label": str(label), "map": None if score_map is None else str(score_map)}
            write_text_atomic(report, json.dumps({**result.report, "outputs": outputs}, indent=1, allow_nan=False))
            written.append(report)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    paths = (label, score_map, report, None if figure is None else figure[0])
    return {name: str(path) for name, path in zip(("label", "map", "report", "figure"), paths, strict=True)
            if path is not None}


def _model_and_inputs(args: argparse.Namespace, settings: Any) -> tuple[Any, list[str]]:
    """``--input demo`` means the bundled demo case, in the model's modality order (the model is loaded here)."""
    from ..anomaly.pipeline import model_spec, resolve_model
    from ..demo import DEMO_WORD, demo_case

    if args.input != [DEMO_WORD]:
        return args.model, args.input
    bundle = resolve_model(args.model, device=settings.device)
    return bundle, [str(p) for p in demo_case("anomaly", model_spec(bundle).modalities).values()]


def run(args: argparse.Namespace) -> dict[str, str]:
    from ..anomaly.pipeline import segment_anomalies
    from ..progress import emit
    from ..volume import read_image

    settings = settings_from_args(args)
    model, inputs = _model_and_inputs(args, settings)
    outputs = [Path(p) for p in (args.output_label, args.output_map, args.report, args.figure) if p is not None]
    _check_outputs(inputs, outputs)
    result = segment_anomalies(model, inputs, settings)
    figure = None if args.figure is None else (Path(args.figure), read_image(inputs[0]))
    written = write_outputs(result, Path(args.output_label), args.output_map and Path(args.output_map),
                            args.report and Path(args.report), figure)
    report = result.report
    emit("summary", lesion_volume_ml=report["lesion_volume_ml"], unhealthy_slices=report["unhealthy_slices"],
         slices=len(report["slices"]))
    print(f"lesion volume {report['lesion_volume_ml']:.2f} mL; {report['unhealthy_slices']} of "
          f"{len(report['slices'])} brain slices called unhealthy", file=sys.stderr)
    return written
