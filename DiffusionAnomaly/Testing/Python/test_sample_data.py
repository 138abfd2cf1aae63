"""The bundled demo cases as Sample Data sources (DiffusionAnomalyLib.sample_data), without the Slicer application.

Run: python -m pytest -q DiffusionAnomaly/Testing/Python/test_sample_data.py. The descriptions are checked against
case.json read here independently; registration against a stand-in with the signature of Slicer's
SampleData.SampleDataLogic.registerCustomSampleDataSource (the real module needs the application, so it is used
only when importable); loading into a real MRML scene when the slicer-core wheel is installed.
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
import urllib.request
from pathlib import Path
from typing import Any

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2]  # DiffusionAnomaly/, as Slicer puts it on sys.path
ROOT = MODULE_DIR.parent
ANOMALY_CASE = ROOT / "Engine" / "src" / "diffusion_engine" / "data" / "demo" / "anomaly"
THUMBNAIL = MODULE_DIR / "Resources" / "Icons" / "DemoTumour.png"
sys.path.insert(0, str(MODULE_DIR))

from DiffusionAnomalyLib import sample_data  # noqa: E402
from DiffusionAnomalyLib.engine import UserError  # noqa: E402

EXPECTED_NODES = {"flair": ("DemoTumour FLAIR", False), "t2": ("DemoTumour T2", False),
                  "t1": ("DemoTumour T1", False), "mask": ("DemoTumour lesion (ground truth)", True)}


def _case() -> dict:
    if not (ANOMALY_CASE / "case.json").is_file():
        pytest.skip("the anomaly demo case is not in this checkout")
    return json.loads((ANOMALY_CASE / "case.json").read_text(encoding="utf-8"))


@pytest.fixture
def anomaly_source() -> sample_data.DemoSource:
    _case()
    source = sample_data.demo_source("anomaly", THUMBNAIL)
    assert source is not None
    return source


@pytest.fixture
def engine_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Point the engine lookup at a fake engine folder; returns a function that writes a demo case into it."""
    monkeypatch.setattr(sample_data, "engine_package_dir", lambda: tmp_path)

    def write_case(kind: str, case: Any, files: tuple[str, ...] = ()) -> Path:
        folder = tmp_path / "diffusion_engine" / "data" / "demo" / kind
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "case.json").write_text(case if isinstance(case, str) else json.dumps(case), encoding="utf-8")
        for name in files:
            (folder / name).write_bytes(b"not really an image")
        return folder

    return write_case


# ------------------------------------------------------------------------------------------------ description


def test_anomaly_source_follows_case_json(anomaly_source: sample_data.DemoSource) -> None:
    case = _case()
    expected_files = [*case["images"].values(), case["mask"]]
    assert [v.path for v in anomaly_source.volumes] == [(ANOMALY_CASE / f).resolve() for f in expected_files]
    assert all(v.path.is_file() for v in anomaly_source.volumes)
    assert {v.key: (v.node_name, v.label_map) for v in anomaly_source.volumes} == EXPECTED_NODES
    assert anomaly_source.sample_name == "DemoTumour" and anomaly_source.thumbnail == THUMBNAIL
    assert anomaly_source.description == case["description"]


def test_sample_data_arguments(anomaly_source: sample_data.DemoSource) -> None:
    arguments = anomaly_source.sample_data_arguments()
    assert arguments["category"] == "Generative brain MRI" and arguments["sampleName"] == "DemoTumour"
    assert arguments["nodeNames"] == [name for name, _ in EXPECTED_NODES.values()]
    assert arguments["loadFileType"] == ["VolumeFile"] * len(EXPECTED_NODES)
    assert arguments["thumbnailFileName"] == str(THUMBNAIL) and THUMBNAIL.is_file()
    assert len(set(arguments["fileNames"])) == len(EXPECTED_NODES)
    for uri, volume, checksum in zip(arguments["uris"], anomaly_source.volumes, arguments["checksums"], strict=True):
        assert uri.startswith("file://")
        assert Path(urllib.request.url2pathname(uri[len("file://"):])) == volume.path
        algo, digest = checksum.split(":")
        assert algo == "SHA256" and digest == hashlib.sha256(volume.path.read_bytes()).hexdigest()


def test_file_uris_fetch_the_files_as_sample_data_does(anomaly_source: sample_data.DemoSource, tmp_path: Path) -> None:
    """Slicer's SampleData downloads with urllib.request.urlretrieve(uri, <cache>/<fileName>): file:// works."""
    for volume in anomaly_source.volumes:
        copied, _ = urllib.request.urlretrieve(volume.uri, tmp_path / volume.cache_name)
        assert Path(copied).read_bytes() == volume.path.read_bytes()


def test_images_for_model_orders_by_modality() -> None:
    loaded = {"flair": "F", "t2": "T", sample_data.MASK: "M"}
    assert sample_data.images_for_model(loaded, ("t2", "flair")) == ["T", "F"]
    assert sample_data.images_for_model(loaded, ("flair",)) == ["F"]
    assert sample_data.images_for_model(loaded, ("t1", "flair")) == ["F", "T"]  # the model needs another image
    assert sample_data.images_for_model(loaded) == ["F", "T"]


def test_aging_case_without_mask_with_age(engine_in) -> None:
    engine_in("aging", {"images": {"t1": "t1.nii.gz"}, "age": 63}, files=("t1.nii.gz",))
    source = sample_data.demo_source("aging", thumbnail="/no/such/thumbnail.png")
    assert [(v.key, v.node_name, v.label_map) for v in source.volumes] == [("t1", "DemoAging T1", False)]
    assert source.age == 63.0 and source.thumbnail is None and source.sample_name == "DemoAging"


def test_missing_case_is_skipped(engine_in) -> None:
    assert sample_data.demo_source("aging") is None
    assert sample_data.register_safely("aging") is None


@pytest.mark.parametrize("case", ['{"images": ', {"mask": "m.nii.gz"}, {"images": {}}, {"images": ["t1.nii.gz"]}])
def test_broken_case_json_is_a_clear_error(engine_in, case: Any) -> None:
    folder = engine_in("anomaly", case)
    with pytest.raises(UserError, match="reinstall the extension") as error:
        sample_data.demo_source("anomaly")
    assert str(folder / "case.json") in str(error.value)


def test_case_naming_a_missing_file_is_a_clear_error(engine_in) -> None:
    folder = engine_in("anomaly", {"images": {"flair": "f.nii.gz"}, "mask": "gone.nii.gz"}, files=("f.nii.gz",))
    with pytest.raises(UserError, match=r"gone\.nii\.gz not found") as error:
        sample_data.demo_source("anomaly")
    assert str(folder / "gone.nii.gz") in str(error.value)
    assert sample_data.register_safely("anomaly") is None  # logged, never raised into module loading


# ------------------------------------------------------------------------------------------------ registration


def _stand_in_sample_data() -> types.ModuleType:
    """Slicer's SampleData registry, reduced to the calls sample_data makes (same names and defaults)."""
    sources: dict[str, list] = {}

    class SampleDataLogic:
        @staticmethod
        def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None,
                                           nodeNames=None, customDownloader=None, thumbnailFileName=None,
                                           loadFileType="VolumeFile", loadFiles=None, loadFileProperties={},  # noqa: B006
                                           checksums=None):
            lengths = {len(uris), len(fileNames), len(nodeNames), len(loadFileType), len(checksums)}
            assert lengths == {len(uris)}, "Slicer raises ValueError when the lists differ in length"
            entry = types.SimpleNamespace(sampleName=sampleName, uris=uris, fileNames=fileNames, nodeNames=nodeNames,
                                          customDownloader=customDownloader, thumbnailFileName=thumbnailFileName)
            sources.setdefault(category, []).append(entry)

        @staticmethod
        def sampleDataSourcesByCategory(category=None):
            return sources if category is None else sources.get(category, [])

    return types.SimpleNamespace(SampleDataLogic=SampleDataLogic, sources=sources)


def test_registration_adds_one_button_per_case(anomaly_source: sample_data.DemoSource) -> None:
    stand_in = _stand_in_sample_data()
    for _ in range(2):  # e.g. a module reload: replaced, not duplicated
        registered = sample_data.register_demo("anomaly", thumbnail=THUMBNAIL, sample_data=stand_in)
    assert registered == anomaly_source
    [entry] = stand_in.sources["Generative brain MRI"]
    assert entry.sampleName == "DemoTumour" and entry.nodeNames == [n for n, _ in EXPECTED_NODES.values()]
    assert repr(entry.customDownloader) == "DemoLoader('anomaly')"  # Sample Data compares sources by their text


def test_loader_passes_names_and_label_flag(anomaly_source: sample_data.DemoSource) -> None:
    calls = []
    loaded = sample_data.load_demo(anomaly_source, lambda path, properties: calls.append((path, properties)) or path)
    assert list(loaded) == list(EXPECTED_NODES)
    assert [(Path(p), props["name"], props["labelmap"]) for p, props in calls] == [
        (v.path, v.node_name, v.label_map) for v in anomaly_source.volumes]


def test_outside_the_application_nothing_is_connected() -> None:
    assert sample_data.register_when_started("anomaly") is False


def test_registration_with_slicers_sample_data(anomaly_source: sample_data.DemoSource) -> None:
    sample_data_module = pytest.importorskip("SampleData", reason="Slicer's SampleData module needs the application")
    sample_data.register_demo("anomaly", thumbnail=THUMBNAIL, sample_data=sample_data_module)
    logic = sample_data_module.SampleDataLogic
    [source] = [s for s in logic.sampleDataSourcesByCategory("Generative brain MRI") if s.sampleName == "DemoTumour"]
    assert source.nodeNames == [n for n, _ in EXPECTED_NODES.values()]
    assert source.loadFileType == ["VolumeFile"] * 3


# ------------------------------------------------------------------------------------------------ loading


def test_demo_loads_into_an_mrml_scene(anomaly_source: sample_data.DemoSource) -> None:
    """Through MRML's own reader (what Slicer's loadVolume uses): the mask is a label map of the stated volume."""
    slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' package is not slicer-core")
    import numpy as np

    scene = slicer.vtkMRMLScene()

    def read(path: str, properties: dict) -> Any:
        node_class = "vtkMRMLLabelMapVolumeNode" if properties["labelmap"] else "vtkMRMLScalarVolumeNode"
        node = scene.AddNewNodeByClass(node_class, properties["name"])
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(path)
        storage.SetCenterImage(0)
        assert storage.ReadData(node), f"MRML could not read {path}"
        return node

    loaded = sample_data.load_demo(anomaly_source, read)
    mask = loaded[sample_data.MASK]
    assert mask.IsA("vtkMRMLLabelMapVolumeNode") and not loaded["flair"].IsA("vtkMRMLLabelMapVolumeNode")
    assert scene.GetFirstNodeByName("DemoTumour lesion (ground truth)") is mask
    labels = slicer.util.arrayFromVolume(mask)
    assert set(np.unique(labels)) == {0, 1}
    lesion_ml = labels.sum() * float(np.prod(mask.GetSpacing())) / 1000.0
    assert lesion_ml == pytest.approx(_case()["lesion_volume_ml"], abs=1e-3)
    assert slicer.util.arrayFromVolume(loaded["flair"]).shape == labels.shape
