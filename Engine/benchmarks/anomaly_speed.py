"""AnoFPDM cost on a BraTS-sized volume: network evaluations, seconds and peak memory, and what striding costs in Dice.

    python Engine/benchmarks/anomaly_speed.py --model MODEL [--subset-slices 16] [--out anomaly_speed.md]

1. A BraTS-sized case (240 x 240 x 155 voxels of 1 mm, FLAIR/T2/T1 + lesion mask) is made from a phantom subject
   (diffusion_engine.phantoms, synthesised at 2 mm and resampled linearly onto that grid around the brain's centre).
2. The case is read and preprocessed once (volume.to_model_slices, timed; its memory peak would hide the forward
   pass's) and its model slices saved. Each configuration then runs in a fresh Python process (so that one's
   allocations cannot hide another's) that loads the model and the slices and segments them
   (pipeline.segment_slices). Peak memory is the child's maximum resident set size (Linux: its VmHWM, because
   the rusage of a child, os.wait4's or getrusage(RUSAGE_CHILDREN)'s, also counts the parent's memory at fork time;
   elsewhere os.wait4's rusage) and, on a GPU, torch.cuda.max_memory_allocated. A "no forward
   pass" process gives the floor (imports, model, slices). With --subset-slices N only N evenly spaced brain slices
   go through the network and the seconds and evaluations per volume are extrapolated linearly to all brain slices
   (the cost per slice does not depend on the slice); the table says so. Seconds per volume add the measured
   preprocessing of the whole volume.
3. Configurations: the default stride vs stride 1 (the paper's full grid), t_max 100 vs 600 at the default
   stride (memory must not grow with t_max: running sums, no stored trajectories), and the default without the
   slice decision (the cost of the model's decision, e.g. the diffusion classifier's own pass).
4. Dice cost of striding: diffusion_engine.anomaly.evaluate on the test split of a small phantom cohort (or
   --cohort MANIFEST), AnoFPDM (DDIM) only, at each stride of --dice-strides. thr_01 and M_max stay the model's
   calibrated values at every stride (the pipeline warns when they were calibrated at another one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BRATS_SIZE = (240, 240, 155)  # x, y, z voxels of 1 mm
MODALITIES = ("flair", "t2", "t1")


# ------------------------------------------------------------------------------------------------ the case


def brats_sized_case(folder: Path, seed: int = 0) -> dict[str, Path]:
    """A phantom subject with lesions on a 240 x 240 x 155, 1 mm grid centred on its brain: {name: path}."""
    import SimpleITK as sitk

    from diffusion_engine.phantoms import anomaly_case, load_anatomy

    anatomy = load_anatomy(2.0)
    case = anomaly_case(anatomy, seed, 0, healthy=False, difficulty="standard")
    template = anatomy.image(case.mask)
    centre = template.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in template.GetSize()])
    direction = np.asarray(template.GetDirection()).reshape(3, 3)
    half = (np.asarray(BRATS_SIZE) - 1) / 2.0  # 1 mm spacing
    reference = sitk.Image(BRATS_SIZE, sitk.sitkFloat32)
    reference.SetSpacing((1.0, 1.0, 1.0))
    reference.SetDirection(template.GetDirection())
    reference.SetOrigin(tuple(np.asarray(centre) - direction @ half))
    paths = {}
    for name, array, interpolator in [*[(m, case.images[m], sitk.sitkLinear) for m in MODALITIES],
                                      ("mask", case.mask, sitk.sitkNearestNeighbor)]:
        image = sitk.Resample(anatomy.image(array), reference, sitk.Transform(), interpolator, 0.0,
                              sitk.sitkUInt8 if name == "mask" else sitk.sitkFloat32)
        paths[name] = folder / f"brats_sized_{name}.nii.gz"
        sitk.WriteImage(image, str(paths[name]))
    return paths


# ------------------------------------------------------------------------------------------------ one configuration


def prepare_slices(model: str, case: dict[str, str], folder: Path) -> dict:
    """Preprocess the case once (timed) and store its model slices for the workers: {slices, pixel area, seconds}."""
    from diffusion_engine.anomaly.pipeline import model_pixel_area_mm2, model_spec, resolve_model
    from diffusion_engine.volume import Normalisation, read_case, to_model_slices

    spec = model_spec(resolve_model(model, device="cpu"))
    started = time.perf_counter()
    images = read_case({m: case[m] for m in spec.modalities}, spec.modalities)
    slices, geometry = to_model_slices(images, spec.image_size,
                                       normalisation=Normalisation.from_dict(spec.normalisation))
    seconds = time.perf_counter() - started
    np.save(folder / "model_slices.npy", slices)
    return {"slices": str(folder / "model_slices.npy"), "pixel_area_mm2": model_pixel_area_mm2(geometry),
            "kept_slices": len(slices), "preprocessing_s": seconds}


def worker(config: dict) -> dict:
    """Run one configuration in this (fresh) process: load the model and the model slices, then (unless
    config["forward"] is false) segment them. Returns the measurements."""
    import torch

    from diffusion_engine import progress
    from diffusion_engine.anomaly.pipeline import AnomalySettings, resolve_model, segment_slices

    progress.configure(quiet=True)
    settings = AnomalySettings(**config["settings"]).validate()
    bundle = resolve_model(config["model"], device=settings.device)
    slices = np.load(config["slices"])
    kept, subset = len(slices), config.get("subset")
    if subset and subset < kept:
        slices = slices[np.linspace(0, kept - 1, subset).round().astype(int)]
    result = {"kept_slices": kept, "measured_slices": len(slices)}
    if config.get("forward", True):
        gpu = torch.cuda.is_available() and settings.device != "cpu"
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        out = segment_slices(bundle, slices, settings, pixel_area_mm2=config["pixel_area_mm2"])
        if gpu:
            torch.cuda.synchronize()
            result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
        result.update(forward_s=time.perf_counter() - started, network_evaluations=out.network_evaluations,
                      grid_steps=len(out.timesteps))
    result["own_peak_rss_bytes"] = _own_peak_rss()
    return result


def _own_peak_rss() -> int | None:
    """This process's peak resident set size since its exec (Linux VmHWM), in bytes; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_isolated(config: dict) -> dict:
    """worker(config) in a fresh interpreter; adds the child's peak resident memory."""
    with tempfile.TemporaryDirectory() as folder:
        request, answer = Path(folder) / "config.json", Path(folder) / "result.json"
        request.write_text(json.dumps(config), encoding="utf-8")
        process = subprocess.Popen([sys.executable, __file__, "--worker", str(request), str(answer)])
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage (ru_maxrss in KiB on Linux)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            raise RuntimeError(f"configuration {config['name']!r} failed (exit code {process.returncode})")
        result = json.loads(answer.read_text(encoding="utf-8"))
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    # Linux folds the parent's peak at fork time into the child's ru_maxrss (the pre-exec memory map is the
    # parent's copy), so a child of a big parent reports at least the parent's peak; VmHWM counts only the memory
    # map the child built after exec. Use it where there is one.
    peak = result.pop("own_peak_rss_bytes") or usage.ru_maxrss * scale
    return {**result, "name": config["name"], "peak_rss_bytes": peak}


# ------------------------------------------------------------------------------------------------ the report


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.0f}"


def speed_rows(results: list[dict], preprocessing_s: float) -> list[str]:
    """Seconds per volume = the measured preprocessing + the (extrapolated) segmentation."""
    rows = ["| Configuration | Grid steps | UNet evaluations / volume | Seconds / volume | Peak RSS (MiB) | "
            "Peak GPU memory (MiB) | Slices through the network |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        if "forward_s" not in r:
            rows.append(f"| {r['name']} | - | 0 | - | {_mib(r['peak_rss_bytes'])} | {_mib(r.get('gpu_peak_bytes'))} | "
                        "none |")
            continue
        factor = r["kept_slices"] / r["measured_slices"]
        extrapolated = factor != 1
        seconds = preprocessing_s + r["forward_s"] * factor
        measured = (f"{r['measured_slices']} of {r['kept_slices']}, EXTRAPOLATED x{factor:.2f}" if extrapolated
                    else f"all {r['kept_slices']}")
        rows.append(f"| {r['name']} | {r['grid_steps']} | {r['network_evaluations'] * factor:,.0f} | {seconds:,.1f} | "
                    f"{_mib(r['peak_rss_bytes'])} | {_mib(r.get('gpu_peak_bytes'))} | {measured} |")
    return rows


def dice_rows(model: str, manifest: Path, strides: list[int], device: str, overrides: dict) -> list[str]:
    from diffusion_engine.anomaly.evaluate import default_settings, run_evaluation
    from diffusion_engine.anomaly.pipeline import resolve_model

    bundle = resolve_model(model, device=device)
    rows = ["| Stride | Grid steps | Mixed Dice | Unhealthy Dice | Unhealthy AUPRC | Slice accuracy | "
            "UNet evaluations / slice | Seconds / slice |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for stride in strides:
        settings = default_settings(bundle, stride=stride, device=device, **overrides)
        evaluation = run_evaluation(bundle, manifest, split="test", variants=["anofpdm"], settings=settings)
        run = evaluation.runs[0]
        mixed, unhealthy = run.metrics["mixed"], run.metrics["unhealthy"]
        rows.append(f"| {stride} | {len(run.slice_results.timesteps)} | {100 * mixed['dice']:.1f} | "
                    f"{100 * unhealthy['dice']:.1f} | {100 * unhealthy['auprc']:.1f} | {100 * mixed['accuracy']:.1f} | "
                    f"{run.evaluations_per_slice:.0f} | {run.seconds / len(evaluation.data):.2f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="calibrated anomaly model folder (default: the demo model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--subset-slices", type=int, default=None,
                        help="time only N evenly spaced brain slices per configuration and extrapolate to the volume")
    parser.add_argument("--stride-1-slices", type=int, default=None,
                        help="like --subset-slices, for the stride-1 configuration only (default: --subset-slices)")
    parser.add_argument("--chunk-size", type=int, default=64, help="slices per network batch (memory scales with it)")
    parser.add_argument("--default-stride", type=int, default=None, help="default: the pipeline's (40)")
    parser.add_argument("--skip-stride-1", action="store_true", help="leave out the stride-1 configuration")
    parser.add_argument("--cohort", type=Path, default=None,
                        help="manifest for the Dice-vs-stride table (test split); default: a new 12-subject phantom "
                             "cohort at 2 mm")
    parser.add_argument("--dice-strides", default="10,20,40,80", help="strides of the Dice table; '' to skip it")
    parser.add_argument("--w", type=float, default=None, help="override the calibrated w (uncalibrated models)")
    parser.add_argument("--thr-01", type=float, default=None, help="override the calibrated thr_01")
    parser.add_argument("--m-max", type=float, default=None, help="override the calibrated M_max")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the case and cohort here")
    parser.add_argument("--out", type=Path, default=Path("anomaly_speed.md"), help="markdown report to write")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        config = json.loads(Path(args.worker[0]).read_text(encoding="utf-8"))
        Path(args.worker[1]).write_text(json.dumps(worker(config)), encoding="utf-8")
        return 0

    from diffusion_engine import progress
    from diffusion_engine.anomaly.evaluate import describe_machine, machine_description
    from diffusion_engine.anomaly.pipeline import DEFAULT_STRIDE, resolve_model
    from diffusion_engine.devices import resolve_device

    progress.configure(quiet=True)
    device = str(resolve_device(args.device))
    model = str(resolve_model(args.model, device="cpu").path)
    overrides = {k: v for k, v in {"w": args.w, "thr_01": args.thr_01, "m_max": args.m_max}.items() if v is not None}
    stride = args.default_stride or DEFAULT_STRIDE
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="anomaly_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"building the BraTS-sized case in {work} ...", flush=True)
    case = {k: str(v) for k, v in brats_sized_case(work).items()}
    prepared = prepare_slices(model, case, work)

    base = {"device": device, "chunk_size": args.chunk_size, **overrides}
    configs = [("no forward pass (imports, model, slices)", {"stride": stride}, False, args.subset_slices),
               (f"stride {stride} (default), t_max 600", {"stride": stride, "t_max": 600}, True, args.subset_slices),
               (f"stride {stride}, t_max 600, no slice decision", {"stride": stride, "t_max": 600, "decision": False},
                True, args.subset_slices),
               (f"stride {stride}, t_max 100", {"stride": stride, "t_max": 100}, True, args.subset_slices)]
    if not args.skip_stride_1:
        configs.append(("stride 1 (paper), t_max 600", {"stride": 1, "t_max": 600}, True,
                        args.stride_1_slices or args.subset_slices))
    results = []
    for name, settings, forward, subset in configs:
        print(f"measuring: {name} ...", flush=True)
        results.append(run_isolated({"name": name, "model": model, "slices": prepared["slices"],
                                     "pixel_area_mm2": prepared["pixel_area_mm2"], "subset": subset,
                                     "forward": forward, "settings": {**base, **settings}}))

    machine = machine_description(device)
    lines = ["# AnoFPDM speed and memory on a BraTS-sized volume", "",
             f"- Machine: {describe_machine(machine)}; {machine['platform']}",
             f"- Model: `{model}`; device {device}; chunk size {args.chunk_size}",
             f"- Case: phantom subject resampled to {' x '.join(map(str, BRATS_SIZE))} voxels of 1 mm; "
             f"{prepared['kept_slices']} brain slices go to the network; reading and preprocessing it took "
             f"{prepared['preprocessing_s']:.1f} s (included in seconds / volume)",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M')}; command: `python {' '.join(sys.argv)}`", ""]
    if any(r.get("measured_slices", 0) < r.get("kept_slices", 0) for r in results):
        lines += ["**Some timings are EXTRAPOLATED** (last column): those configurations sent only a few evenly "
                  "spaced brain slices through the network; seconds and evaluations were scaled to all brain slices. "
                  "Peak memory is as measured (it depends on the chunk size, not on the number of slices).", ""]
    lines += speed_rows(results, prepared["preprocessing_s"])
    memory = {r["name"]: r["peak_rss_bytes"] for r in results}
    short, long = memory[f"stride {stride}, t_max 100"], memory[f"stride {stride} (default), t_max 600"]
    lines += ["", f"Peak RSS at t_max 600 vs 100: {_mib(long)} vs {_mib(short)} MiB "
                  f"({'no growth' if long <= short * 1.05 else 'GROWS'}, 5% tolerance)."]
    strides = [int(s) for s in args.dice_strides.split(",") if s.strip()]
    if strides:
        manifest = args.cohort
        if manifest is None:
            from diffusion_engine.phantoms import make_anomaly_cohort

            print("building a 12-subject phantom cohort for the Dice table ...", flush=True)
            manifest = make_anomaly_cohort(work / "cohort", subjects=12, spacing=2.0, seed=1, overwrite=True)
        print("Dice vs stride ...", flush=True)
        lines += ["", f"## Dice cost of striding (AnoFPDM DDIM, test split of `{manifest}`)", "",
                  "thr_01 and M_max are the model's calibrated values at every stride.", "",
                  *dice_rows(model, manifest, strides, device, overrides)]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


def _main() -> int:
    from diffusion_engine.errors import EngineError

    try:
        return main()
    except EngineError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(_main())
