"""DiffusionAging's logic without Qt: a T1 volume node in, `diffusion-engine aging` in a subprocess, volumes out.

    from DiffusionAgingLib.aging import AgingLogic
    results = AgingLogic().process(t1Node, age=63, target_age=75, model="/path/to/model")   # blocking
    print(results.summary())

Results (a re-run for the same input replaces them): "<input> at age 75" with the input's exact geometry, a signed
difference volume (counterfactual - input, DivergingBlueRed), and for an age sweep a Sequence node (one item per
target age, with a browser to scrub through them), all under the input's study in Subject Hierarchy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from DiffusionAnomalyLib.engine import UserError
from DiffusionAnomalyLib.jobs import SceneJob, check_volumes, read_report
from DiffusionAnomalyLib.models import ModelInfo, check_input_count, resolve_model
from DiffusionAnomalyLib.nodes import output_node, place_like, read_volume_array, remove_outputs, set_volume, use_color

MODULE = "DiffusionAging"
DEVICES = ("auto", "cuda", "cpu")
PRECISIONS = ("float32", "bfloat16")
DIVERGING = "vtkMRMLColorTableNodeFileDivergingBlueRed.txt"
OUTPUT_FILE, DIFFERENCE_FILE, REPORT_FILE = "aged.nrrd", "difference.nrrd", "report.json"


@dataclass
class AgingOptions:
    """What the panel sets; None keeps the model's calibrated value (or the paper's)."""
    age: float = 0.0  # the subject's age at this scan, years
    target_ages: tuple[float, ...] = ()  # one age, or several for a sweep
    model: str = ""  # model folder; empty = the bundled demo model
    device: str = "auto"
    noise_level: float | None = None  # fixed L in (0, 1]; None = ONLS chooses it per subject
    guidance_scale: float | None = None
    whole_brain: bool = False  # every brain slice, not only the model's central slab
    precision: str = "float32"  # the UNet's; "bfloat16" is faster where the hardware has it
    extra_args: tuple[str, ...] = ()  # further `diffusion-engine aging` options, for researchers

    def validate(self) -> AgingOptions:
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise UserError(f"Unknown device {self.device!r}. Use one of {', '.join(DEVICES)}.")
        if not self.target_ages:
            raise UserError("No target age is given. Enter the age to show (or several, comma-separated).")
        if not 0 < self.age < 130 or not all(0 < a < 130 for a in self.target_ages):
            raise UserError("Ages must be in years, between 0 and 130. Enter the subject's current age and the "
                            "target age(s).")
        if self.noise_level is not None and not 0 < self.noise_level <= 1:
            raise UserError(f"The noise level L must be in (0, 1], got {self.noise_level}.")
        if self.precision not in PRECISIONS:
            raise UserError(f"Unknown precision {self.precision!r}. Use one of {', '.join(PRECISIONS)}.")
        return self

    @property
    def sweep(self) -> bool:
        return len(self.target_ages) > 1

    def engine_args(self) -> list[str]:
        targets = (["--target-ages", ",".join(f"{a:g}" for a in self.target_ages)] if self.sweep
                   else ["--target-age", f"{self.target_ages[0]:g}"])
        args = ["--age", f"{self.age:g}", *targets, "--device", self.device]
        if self.noise_level is not None:
            args += ["--noise-level", repr(self.noise_level)]
        if self.guidance_scale is not None:
            args += ["--guidance-scale", repr(self.guidance_scale)]
        if self.whole_brain:
            args += ["--central-slices", "0"]
        if self.precision != "float32":
            args += ["--precision", self.precision]
        return [*args, *self.extra_args]


@dataclass
class AgingResults:
    images: list  # one volume node per target age
    differences: list
    target_ages: list[float]
    noise_level: dict  # mode (onls/fixed), t0, L
    regressor_age: dict  # before: float, after: [float per target age]
    report: dict
    sequence: Any = None  # sweep only: the counterfactual volumes as a Sequence, and its browser
    browser: Any = None
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        after = ", ".join(f"{a:.1f}" for a in self.regressor_age["after"])
        return (f"Noise level L = {self.noise_level['L']:.2f} ({self.noise_level['mode']}); the regressor's age "
                f"{self.regressor_age['before']:.1f} -> {after} years.")


class AgingLogic:
    """Qt-free: takes nodes explicitly; the scene is the input node's."""

    def process(self, inputs: Any, options: AgingOptions | None = None, *, blocking: bool = True,
                on_event: Callable[[dict], None] | None = None, on_log: Callable[[str], None] | None = None,
                on_finished: Callable[[SceneJob], None] | None = None, keep_files: bool = False,
                python: str | None = None, target_age: float | None = None, **option_values: Any
                ) -> AgingResults | SceneJob:
        """Show the input at other age(s). Keywords: age=, target_age= (or target_ages=[...]), model=, device=, ...

        Blocking returns AgingResults; otherwise the started SceneJob (poll(), cancel(), .results / .error).
        """
        if target_age is not None:
            option_values["target_ages"] = (float(target_age),)
        options = _options(options, option_values).validate()
        volumes = check_volumes(list(inputs) if isinstance(inputs, (list, tuple)) else [inputs])
        model = resolve_model(options.model, "aging")
        check_input_count(model, len(volumes))
        reference = volumes[0]
        job = SceneJob(MODULE, "aging", volumes, lambda files, work: _engine_args(model, options, files, work),
                       lambda work, outputs: self.apply_results(reference, work, job.engine.warnings),
                       on_event=on_event, on_log=on_log, on_finished=on_finished, keep_files=keep_files,
                       python=python).start()
        return job.result_or_raise() if blocking else job

    def apply_results(self, reference: Any, workdir: Path, warnings: Sequence[str] = ()) -> AgingResults:
        report = read_report(workdir / REPORT_FILE)
        files = report["outputs"]
        targets = [float(a) for a in report["target_ages"]]
        images = [read_volume_array(path, reference) for path in files["images"]]
        differences = [read_volume_array(path, reference) for path in files["differences"]]
        scene, name = reference.GetScene(), reference.GetName()
        sweep = len(targets) > 1
        scene.StartState(scene.BatchProcessState)
        try:
            if not sweep:  # leftovers of an earlier sweep
                remove_outputs(scene, MODULE, reference, ["sequence", "browser"])
            image_nodes = [self._volume(scene, reference, "image" if i == 0 else f"image-{i}", array,
                                        f"{name} at age {age:g}")
                           for i, (array, age) in enumerate(zip(images, targets, strict=True))]
            difference_nodes = [self._volume(scene, reference, "difference" if i == 0 else f"difference-{i}",
                                             array, f"{name} age difference {age:g}")
                                for i, (array, age) in enumerate(zip(differences, targets, strict=True))]
            for node in difference_nodes:
                self._show_difference(node)
            self._drop_extra(scene, reference, len(targets))
            sequence = browser = None
            if sweep:
                sequence, browser = self._sequence(scene, reference, image_nodes, targets, name)
            for node in [*image_nodes, *difference_nodes, *(n for n in (sequence, browser) if n is not None)]:
                place_like(node, reference)
        finally:
            scene.EndState(scene.BatchProcessState)
        return AgingResults(images=image_nodes, differences=difference_nodes, target_ages=targets,
                            noise_level=report["noise_level"], regressor_age=report["regressor_age"], report=report,
                            sequence=sequence, browser=browser, warnings=[*warnings, *report.get("warnings", [])])

    def remove_results(self, reference: Any) -> None:
        """Remove every node this module made for ``reference``."""
        remove_outputs(reference.GetScene(), MODULE, reference, None)

    @staticmethod
    def _volume(scene: Any, reference: Any, role: str, array: Any, name: str) -> Any:
        node = output_node(scene, MODULE, reference, role, "vtkMRMLScalarVolumeNode", name)
        set_volume(node, array.astype("float32"), reference)
        return node

    @staticmethod
    def _show_difference(node: Any) -> None:
        import numpy as np
        import slicer

        display = node.GetDisplayNode()
        use_color(display, DIVERGING)
        limit = float(np.abs(slicer.util.arrayFromVolume(node)).max()) or 1.0
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(-limit, limit)  # zero (no change) in the middle of the colour map

    @staticmethod
    def _drop_extra(scene: Any, reference: Any, count: int) -> None:
        """Remove per-age nodes of an earlier, longer sweep."""
        for prefix in ("image", "difference"):
            index = count
            while True:
                before = scene.GetNumberOfNodes()
                remove_outputs(scene, MODULE, reference, [f"{prefix}-{index}"])
                if scene.GetNumberOfNodes() == before:
                    break
                index += 1

    @staticmethod
    def _sequence(scene: Any, reference: Any, images: list, targets: list[float], name: str) -> tuple[Any, Any]:
        sequence = output_node(scene, MODULE, reference, "sequence", "vtkMRMLSequenceNode", f"{name} age sweep")
        sequence.RemoveAllDataNodes()
        sequence.SetIndexName("age")
        sequence.SetIndexUnit("years")
        sequence.SetIndexType(sequence.NumericIndex)
        for node, age in zip(images, targets, strict=True):
            sequence.SetDataNodeAtValue(node, f"{age:g}")
        browser = output_node(scene, MODULE, reference, "browser", "vtkMRMLSequenceBrowserNode",
                              f"{name} age sweep browser")
        browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
        return sequence, browser


def _options(options: AgingOptions | None, values: dict[str, Any]) -> AgingOptions:
    known = {f.name for f in fields(AgingOptions)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: target_age, {', '.join(sorted(known))}")
    base = options or AgingOptions()
    merged = {**{f.name: getattr(base, f.name) for f in fields(AgingOptions)}, **values}
    merged["target_ages"] = tuple(float(a) for a in merged["target_ages"])
    return AgingOptions(**merged)


def _engine_args(model: ModelInfo, options: AgingOptions, files: list[Path], work: Path) -> list[str]:
    return ["--model", str(model.path), "--input", *map(str, files), "--output", str(work / OUTPUT_FILE),
            "--difference", str(work / DIFFERENCE_FILE), "--report", str(work / REPORT_FILE), *options.engine_args()]
