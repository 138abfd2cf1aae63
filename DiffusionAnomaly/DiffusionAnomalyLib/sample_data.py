"""The engine's bundled demo cases as Sample Data buttons, so a new user can try a module in two clicks.

Shared by both modules: each registers its own case once Slicer has started (``register_when_started``); the
button loads the case's local files (nothing is downloaded), selects them in the module's panel and opens it, so the
second click is Apply. A missing SampleData module, a missing case or a broken case.json never stops a module
from loading: the button is then simply absent and the reason is logged.

A case is a folder ``<engine>/diffusion_engine/data/demo/<kind>/`` whose ``case.json`` names its images per modality
(``"images": {"flair": "demo_flair.nii.gz", ...}``) and optionally a ground-truth ``"mask"`` and the subject's
``"age"`` (see Engine/src/diffusion_engine/demo.py). From the Python console, without the Sample Data module:

    from DiffusionAnomalyLib.sample_data import load_demo
    nodes = load_demo("anomaly")   # {"flair": node, "t2": node, "mask": label map node}

Stdlib only at file scope; ``slicer`` is imported where a node is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .engine import ENGINE_PACKAGE, UserError, engine_package_dir

CATEGORY = "Generative brain MRI"
MASK = "mask"  # key of the ground-truth label map among a loaded case's nodes
CACHE_PREFIX = "GenerativeBrainMRI"  # Sample Data's own loader copies file:// sources into its cache under this name


@dataclass(frozen=True)
class DemoStyle:
    """How one kind of demo case appears in Sample Data and in the scene."""
    sample_name: str  # the button's text; also slicer's SampleData.downloadSample(name)
    node_prefix: str  # node names are "<prefix> <MODALITY>" and "<prefix> <mask_label> (ground truth)"
    mask_label: str


STYLES = {
    "anomaly": DemoStyle("DemoTumour", "DemoTumour", "lesion"),
    "aging": DemoStyle("DemoAging", "DemoAging", "ventricles"),
}


@dataclass(frozen=True)
class DemoVolume:
    path: Path
    node_name: str
    key: str  # the modality ("flair", ...) or MASK
    label_map: bool

    @property
    def uri(self) -> str:
        return self.path.as_uri()

    @property
    def cache_name(self) -> str:
        return f"{CACHE_PREFIX}-{self.path.parent.name}-{self.path.name}"

    def checksum(self) -> str:
        """In Sample Data's "<algo>:<digest>" form, so a stale copy in its cache is replaced, never reused."""
        return "SHA256:" + hashlib.sha256(self.path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class DemoSource:
    """One demo case, ready to register: its volumes (images first, in case.json order, then the mask)."""
    kind: str
    sample_name: str
    volumes: tuple[DemoVolume, ...]
    description: str = ""
    age: float | None = None
    thumbnail: Path | None = None

    def sample_data_arguments(self) -> dict[str, Any]:
        """Keyword arguments of SampleData.SampleDataLogic.registerCustomSampleDataSource (but customDownloader)."""
        return {
            "category": CATEGORY,
            "sampleName": self.sample_name,
            "uris": [v.uri for v in self.volumes],
            "fileNames": [v.cache_name for v in self.volumes],
            "nodeNames": [v.node_name for v in self.volumes],
            "checksums": [v.checksum() for v in self.volumes],
            "loadFileType": ["VolumeFile"] * len(self.volumes),
            "thumbnailFileName": str(self.thumbnail) if self.thumbnail else None,
        }


# ------------------------------------------------------------------------------------------------ describing


def demo_folder(kind: str) -> Path | None:
    """The bundled demo case folder for ``kind`` (it may not exist), or None if the engine is not found."""
    root = engine_package_dir()
    return None if root is None else root / ENGINE_PACKAGE / "data" / "demo" / kind


def demo_source(kind: str, thumbnail: str | Path | None = None) -> DemoSource | None:
    """The demo case of ``kind`` from its case.json, or None when it is not bundled.

    Raises UserError when case.json is unreadable or names a file that is not there.
    """
    style = STYLES[kind]
    folder = demo_folder(kind)
    if folder is None or not (folder / "case.json").is_file():
        return None
    case_file = folder / "case.json"
    try:
        case = json.loads(case_file.read_text(encoding="utf-8"))
        images = dict(case["images"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{case_file} cannot be read as a demo case ({error!r}); reinstall the extension.") from None
    if not images:
        raise UserError(f"{case_file} lists no images; reinstall the extension.")
    volumes = [DemoVolume(folder / str(name), f"{style.node_prefix} {modality.upper()}", modality, False)
               for modality, name in images.items()]
    if case.get("mask"):
        volumes.append(DemoVolume(folder / str(case["mask"]), f"{style.node_prefix} {style.mask_label} (ground truth)",
                                  MASK, True))
    missing = [str(v.path) for v in volumes if not v.path.is_file()]
    if missing:
        raise UserError(f"The {kind} demo case is incomplete: {', '.join(missing)} not found; reinstall the extension.")
    age = case.get("age")
    thumbnail = Path(thumbnail) if thumbnail and Path(thumbnail).is_file() else None
    return DemoSource(kind=kind, sample_name=style.sample_name, volumes=tuple(volumes),
                      description=str(case.get("description", "")),
                      age=float(age) if isinstance(age, (int, float)) else None, thumbnail=thumbnail)


# ------------------------------------------------------------------------------------------------ loading


def _slicer_load_volume(path: str, properties: dict[str, Any]) -> Any:
    import slicer

    return slicer.util.loadVolume(path, properties)


def load_demo(kind_or_source: str | DemoSource, load_volume: Callable[[str, dict[str, Any]], Any] | None = None
              ) -> dict[str, Any]:
    """Load a demo case's local files into the scene: {modality or MASK: node}; the mask as a label map.

    ``load_volume(path, properties)`` defaults to slicer.util.loadVolume (the application's readers).
    """
    source = kind_or_source if isinstance(kind_or_source, DemoSource) else demo_source(kind_or_source)
    if source is None:
        raise UserError(f"No {kind_or_source} demo case is bundled with this version of the extension.")
    load_volume = load_volume or _slicer_load_volume
    loaded = {}
    for volume in source.volumes:
        properties = {"name": volume.node_name, "labelmap": volume.label_map, "show": False}
        loaded[volume.key] = load_volume(str(volume.path), properties)
    return loaded


def images_for_model(loaded: dict[str, Any], modalities: tuple[str, ...] | list[str] = ()) -> list[Any]:
    """A loaded case's image nodes in the model's modality order; the case's order if the model needs others."""
    images = {key: node for key, node in loaded.items() if key != MASK}
    if modalities and set(modalities) <= set(images):
        return [images[m] for m in modalities]
    return list(images.values())


def _show(loaded: dict[str, Any]) -> None:
    """The case's first image as background and its ground truth (or none) as the label layer."""
    import slicer

    slicer.util.setSliceViewerLayers(background=images_for_model(loaded)[0], label=loaded.get(MASK), fit=True)


class DemoLoader:
    """Sample Data's customDownloader for a demo case: load, show, then ``on_loaded(source, nodes)``.

    Sample Data compares sources by their text, so the repr is stable (no object address).
    """

    def __init__(self, source: DemoSource, on_loaded: Callable[[DemoSource, dict[str, Any]], None] | None = None):
        self.source, self.on_loaded = source, on_loaded

    def __repr__(self) -> str:
        return f"DemoLoader({self.source.kind!r})"

    def __call__(self, _sample_data_source: Any = None) -> list[Any]:
        try:
            loaded = load_demo(self.source)
            _show(loaded)
            if self.on_loaded is not None:
                self.on_loaded(self.source, loaded)
        except Exception as error:  # a button callback: show the problem instead of losing it in the log
            import slicer

            slicer.util.errorDisplay(f"The {self.source.sample_name} demo case could not be loaded: {error}")
            return []
        return list(loaded.values())


# ------------------------------------------------------------------------------------------------ registering


def register_demo(kind: str, on_loaded: Callable[[DemoSource, dict[str, Any]], None] | None = None,
                  thumbnail: str | Path | None = None, sample_data: Any = None) -> DemoSource | None:
    """Add the demo case's button to Sample Data (replacing an earlier registration of it); None if not bundled.

    ``sample_data`` is the SampleData module (imported when not given).
    """
    source = demo_source(kind, thumbnail)
    if source is None:
        return None
    if sample_data is None:
        import SampleData as sample_data
    logic = sample_data.SampleDataLogic
    # A module reload makes a new loader, which Sample Data would not see as the same source: drop the old entry.
    registered = logic.sampleDataSourcesByCategory(CATEGORY)
    registered[:] = [s for s in registered if getattr(s, "sampleName", None) != source.sample_name]
    logic.registerCustomSampleDataSource(**source.sample_data_arguments(),
                                         customDownloader=DemoLoader(source, on_loaded))
    return source


def register_safely(kind: str, on_loaded: Callable[[DemoSource, dict[str, Any]], None] | None = None,
                    thumbnail: str | Path | None = None) -> DemoSource | None:
    """register_demo that logs instead of raising: a demo button is never worth a module that fails to load."""
    try:
        source = register_demo(kind, on_loaded, thumbnail)
    except ImportError:
        logging.info("Sample Data module not available: the %s demo case is not registered.", kind)
        return None
    except Exception as error:
        logging.warning("The %s demo case was not added to Sample Data: %s", kind, error)
        return None
    if source is None:
        logging.info("No %s demo case is bundled: nothing added to Sample Data.", kind)
    return source


def register_when_started(kind: str, on_loaded: Callable[[DemoSource, dict[str, Any]], None] | None = None,
                          thumbnail: str | Path | None = None) -> bool:
    """Register the demo case once the application has started (Sample Data is loaded by then).

    For a module's __init__. False, and nothing happens, outside the Slicer application (e.g. slicer-core).
    """
    try:
        import slicer

        app = slicer.app
        app.connect("startupCompleted()", lambda: register_safely(kind, on_loaded, thumbnail))
    except Exception as error:  # no application (slicer-core, tests) or an unexpected Qt binding
        logging.debug("The %s demo case is not registered: %s", kind, error)
        return False
    return True
