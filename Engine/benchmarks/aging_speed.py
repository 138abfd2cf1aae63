"""ONLS cost per subject with an aging model (default: the bundled demo model): seconds and peak memory.

    python Engine/benchmarks/aging_speed.py [--model MODEL] [--out aging_speed.md] [--steps 100]

The bundled demo case (a 2 mm phantom T1, 99 x 117 x 95 voxels, age 65.8) is aged to 76.1 years by
`diffusion-engine aging` in a fresh Python process per configuration, which reports its own peak resident memory
(Linux VmHWM) when it ends; the wall time includes reading, preprocessing, the ONLS encoding, the guided decoding
and writing the outputs. Configurations: the model's central slab (the default) with ONLS, with a fixed L = 0.6 and
with the paper's output (`--composition decoded`: no unguided decoding to subtract), and every brain slice
(`--central-slices 0`) with ONLS, its variance rule reading the model's slab (the default) or every slice
(`--variance-slices 0`), in float32 and with the UNet under bfloat16 autocast (`--precision bfloat16`),
then one UNet call per weight layout and precision in this process. The report's network evaluations come from the
run's own JSON report; the UNet runs under no_grad in every configuration (the regressor alone is differentiated:
Engine/tests/test_aging_onls.py checks that no UNet parameter receives a gradient).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from restore_speed import CHILD  # the same fresh-process runner that reports its own VmHWM

CONFIGURATIONS = (("central slab, ONLS", []), ("central slab, fixed L = 0.6", ["--noise-level", "0.6"]),
                  ("central slab, ONLS, guided decoding only", ["--composition", "decoded"]),
                  ("all brain slices, ONLS", ["--central-slices", "0"]),
                  ("all brain slices, ONLS, rule over every slice",
                   ["--central-slices", "0", "--variance-slices", "0"]),
                  ("all brain slices, ONLS, bfloat16 UNet", ["--central-slices", "0", "--precision", "bfloat16"]))
LAYOUT_SLICES, LAYOUT_REPEATS = 72, 5


def run_aging(model: str, extra: list[str], steps: int, folder: Path, index: int) -> dict:
    """One `diffusion-engine aging` on the demo case in a fresh interpreter: wall seconds, peak memory, report."""
    from diffusion_engine.demo import demo_description

    answer, report = folder / f"memory_{index}.json", folder / f"report_{index}.json"
    target = demo_description("aging")["follow_up"]["age"]
    command = [sys.executable, "-c", CHILD, str(answer), "--progress", "none", "aging", "--model", model,
               "--input", "demo", "--target-age", f"{target:g}", "--output", str(folder / f"cf_{index}.nii.gz"),
               "--report", str(report), "--steps", str(steps), "--device", "cpu", *extra]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, **json.loads(answer.read_text()), "report": json.loads(report.read_text())}


def unet_layouts(model: str) -> dict[str, float]:
    """Median seconds of one UNet call on LAYOUT_SLICES random slices in this process, per weight layout and
    precision: what the engine's channels_last convolutions (nets/bundle.py) and ``--precision bfloat16`` buy."""
    import statistics

    import torch

    from diffusion_engine.aging.pipeline import model_spec, resolve_model
    from diffusion_engine.nets.bundle import load_bundle
    from diffusion_engine.nets.precision import with_precision

    bundle = resolve_model(model, device="cpu")  # as the engine loads it: channels_last convolutions
    engine = bundle.networks["eps"]
    contiguous = load_bundle(bundle.path, kind="aging").networks["eps"]  # the weights as stored
    spec = model_spec(bundle)
    x = torch.randn(LAYOUT_SLICES, len(spec.modalities), *spec.image_size, generator=torch.Generator().manual_seed(0))
    t = torch.full((LAYOUT_SLICES,), 500)
    networks = {"contiguous (NCHW) weights, float32": contiguous, "channels_last weights, float32 (engine)": engine,
                "channels_last weights, bfloat16 autocast": with_precision(engine, "bfloat16")}
    times: dict[str, list[float]] = {name: [] for name in networks}
    with torch.no_grad():
        for _ in range(LAYOUT_REPEATS):  # interleaved, so a slow moment of the machine hits every variant
            for name, network in networks.items():
                started = time.perf_counter()
                network(x, t)
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values[1:]) for name, values in times.items()}


def markdown(rows: list[tuple[str, dict]], model: str, steps: int, threads: int) -> str:
    lines = [f"# ONLS aging speed ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
             f"threads {threads})", "",
             f"Model `{model}`, the bundled demo case (2 mm phantom T1, age 65.8 -> 76.1), {steps} DDIM steps over "
             "the chain; each run is one `diffusion-engine aging` in a fresh process (read, preprocess, encode, "
             "decode, write).", "",
             "| configuration | composition | slices | variance rule over | L | UNet evaluations | "
             "regressor evaluations | seconds | peak memory (GB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows:
        report = row["report"]
        evaluations = report["network_evaluations"]
        slices = report["slices"]["count"]
        level = report["noise_level"]
        rule = "-" if level["mode"] == "fixed" else f"{report['slices']['variance_rule']} slices"
        chosen = f"{level['L']:.2f}" + (" (fallback)" if level["mode"] == "fallback" else "")
        lines.append(f"| {name} | {report['composition']} | {slices} | {rule} | {chosen} | "
                     f"{evaluations['eps']} | {evaluations['regressor']} | {row['seconds']:.1f} | "
                     f"{row['peak_rss_bytes'] / 1e9:.2f} |")
    lines += ["", "Regressor evaluations include the gradient passes of the guided decoding (one per slice and step); "
              "age-change adds one unguided decoding (UNet only) to subtract."]
    return "\n".join(lines) + "\n"


def layout_markdown(layouts: dict[str, float]) -> str:
    first = next(iter(layouts.values()))
    lines = ["", f"One UNet call on {LAYOUT_SLICES} slices, in this process (median of {LAYOUT_REPEATS - 1} "
             "interleaved repeats):", "", "| weights and precision | seconds | speed-up |", "|---|---:|---:|"]
    lines += [f"| {name} | {seconds:.3f} | {first / seconds:.2f}x |" for name, seconds in layouts.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="aging model folder (default: the bundled demo model)")
    parser.add_argument("--out", default=None, help="markdown report to write (also printed)")
    parser.add_argument("--steps", type=int, default=100, help="DDIM steps over the chain (default 100)")
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as name:
        rows = [(label, run_aging(args.model, extra, args.steps, Path(name), index))
                for index, (label, extra) in enumerate(CONFIGURATIONS)]
    text = markdown(rows, args.model, args.steps, torch.get_num_threads()) + layout_markdown(unet_layouts(args.model))
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
