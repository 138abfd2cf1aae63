"""DiffusionAging's Qt-free logic on a real MRML scene (the `slicer-core` wheel), running the real engine.

Run: python -m pytest -q DiffusionAging/Testing/Python (with slicer-core and the engine installed). The model is a
freshly initialised tiny bundle (no training): plumbing, geometry and the scene only.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)
if importlib.util.find_spec("diffusion_engine.commands.aging") is None:
    pytest.skip("the engine has no aging command yet (diffusion_engine.commands.aging)", allow_module_level=True)

import vtk  # noqa: E402

HERE = Path(__file__).resolve()
sys.path[:0] = [str(HERE.parents[2]), str(HERE.parents[3] / "DiffusionAnomaly")]  # as Slicer puts them on sys.path

from DiffusionAgingLib.aging import AgingLogic  # noqa: E402
from DiffusionAnomalyLib import nodes  # noqa: E402
from DiffusionAnomalyLib.engine import UserError  # noqa: E402

SHAPE_KJI = (12, 18, 16)
RUN = {"age": 60.0, "device": "cpu", "noise_level": 0.3, "extra_args": ("--steps", "2")}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained T1 aging bundle at 32 px (unconditional UNet + age regressor), via the engine's bundle writer."""
    import torch
    from diffusion_engine.nets.bundle import save_bundle
    from diffusion_engine.nets.presets import build_preset
    from diffusion_engine.schedule import linear_schedule
    from diffusion_engine.volume import Normalisation

    torch.manual_seed(0)
    shape = {"image_size": 32, "in_channels": 1}
    networks = {"eps": build_preset("tiny", **shape, out_channels=1, num_classes=None),
                "regressor": build_preset("regressor", **shape, out_channels=1)}
    return save_bundle(tmp_path_factory.mktemp("model") / "t1-aging", networks, kind="aging",
                       schedule=linear_schedule(1000),
                       preprocessing={"modalities": ["t1"], "image_size": [32, 32],
                                      "normalisation": Normalisation("onls").to_dict(), "central_slices": 0},
                       labels={"age_low": 40.0, "age_high": 90.0})


def _volume(scene: object, matrix: np.ndarray) -> object:
    k, j, i = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE_KJI), indexing="ij")
    brain = (k / 0.9) ** 2 + (j / 0.8) ** 2 + (i / 0.75) ** 2 < 1
    image = np.where(brain, 100.0 + 30.0 * (np.abs(i) < 0.2), 0.0).astype(np.float32)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T1")
    slicer.util.updateVolumeFromArray(volume, image)
    vtk_matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vtk_matrix.SetElement(r, c, matrix[r, c])
    volume.SetIJKToRASMatrix(vtk_matrix)
    return volume


def test_aging_outputs_on_the_input_grid_and_sweep_sequence(tiny_model: Path) -> None:
    scene = slicer.vtkMRMLScene()
    angle = np.radians(25.0)
    matrix = np.eye(4)
    matrix[:3, :3] = np.array([[np.cos(angle), 0, np.sin(angle)], [0, -1, 0], [-np.sin(angle), 0, np.cos(angle)]]) \
        @ np.diag([1.5, 1.5, 3.0])  # oblique, left-handed, anisotropic
    matrix[:3, 3] = (10.0, -20.0, 5.0)
    volume = _volume(scene, matrix)
    before = slicer.util.arrayFromVolume(volume).copy()
    logic = AgingLogic()

    with pytest.raises(UserError, match="No target age"):
        logic.process(volume, model=str(tiny_model), age=60.0)

    single = logic.process(volume, model=str(tiny_model), target_age=75, **RUN)
    (image,), (difference,) = single.images, single.differences
    assert image.GetName() == "T1 at age 75"
    for node in (image, difference):
        np.testing.assert_array_equal(nodes.ijk_to_ras(node), nodes.ijk_to_ras(volume))
    aged, delta = slicer.util.arrayFromVolume(image), slicer.util.arrayFromVolume(difference)
    np.testing.assert_allclose(aged, before + delta, atol=1e-3)  # the engine's output = input + difference
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), before)
    assert single.noise_level["mode"] == "fixed" and 0 < single.noise_level["L"] <= 1  # the engine snaps L to its grid
    assert single.report["settings"]["noise_level"] == pytest.approx(0.3)

    sweep = logic.process(volume, model=str(tiny_model), target_ages=(65, 80), **RUN)
    assert [n.GetName() for n in sweep.images] == ["T1 at age 65", "T1 at age 80"]
    assert sweep.images[0].GetID() == image.GetID()  # re-run replaces the earlier output
    assert sweep.sequence.GetNumberOfDataNodes() == 2 and sweep.sequence.GetNthIndexValue(1) == "80"
    assert len(sweep.regressor_age["after"]) == 2
    again = logic.process(volume, model=str(tiny_model), target_age=70, **RUN)
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 3  # input, image, difference
    assert scene.GetNumberOfNodesByClass("vtkMRMLSequenceNode") == 0
    assert again.images[0].GetName() == "T1 at age 70"


def test_whole_brain_and_reduced_precision_reach_the_engine(tiny_model: Path) -> None:
    from diffusion_engine.commands.aging import PRECISIONS as ENGINE_PRECISIONS
    from DiffusionAgingLib.aging import PRECISIONS

    assert PRECISIONS == ENGINE_PRECISIONS  # spelled in the panel too: the engine may live in another Python
    scene = slicer.vtkMRMLScene()
    volume = _volume(scene, np.diag([2.0, 2.0, 2.0, 1.0]))
    logic = AgingLogic()
    with pytest.raises(UserError, match="Unknown precision"):
        logic.process(volume, model=str(tiny_model), target_age=75, precision="float16", **RUN)
    plain = logic.process(volume, model=str(tiny_model), target_age=75, **RUN)
    assert plain.report["settings"]["central_slices"] is None and plain.report["settings"]["precision"] == "float32"
    chosen = logic.process(volume, model=str(tiny_model), target_age=75, whole_brain=True, precision="bfloat16", **RUN)
    assert chosen.report["settings"]["central_slices"] == 0 and chosen.report["settings"]["precision"] == "bfloat16"
