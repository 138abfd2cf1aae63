"""Model bundles: a folder with ``model.json`` and one ``<network>.safetensors`` per network.

``model.json``::

    {"format": "diffusion-engine-model", "format_version": 1, "kind": "anomaly" | "aging" | "restore" | "generic",
     "networks": {"eps": {"class": "UNetModel", "config": {...guided-diffusion kwargs...},
                          "weights": "eps.safetensors", "sha256": "<hex>"}, ...},
     "schedule": {...Schedule.to_config()...} | null, "preprocessing": {...}, "labels": {...},
     "calibration": {...}, "training": {...}, "created_by": "diffusion-engine 0.1.0"}

Weights are only ever read with safetensors; pickled PyTorch checkpoints are refused here and converted once,
by ``diffusion-engine import-checkpoint`` (``torch.load(weights_only=True)``, which runs no code).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..errors import InputError, ModelError
from ..fileio import plain_permissions, write_text_atomic
from .unet import NETWORK_CLASSES, build_network

FORMAT = "diffusion-engine-model"
FORMAT_VERSION = 1
CONFIG_NAME = "model.json"
KINDS = ("anomaly", "aging", "restore", "generic")
SECTIONS = ("schedule", "preprocessing", "labels", "calibration", "training")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle", ".tar")
_NETWORK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_IMPORT_HINT = ("convert it once with `diffusion-engine import-checkpoint --from guided-diffusion --weights FILE "
                "--config CONFIG.json --out MODEL_FOLDER`, then pass MODEL_FOLDER")
_LISTED = 5  # how many offending keys an error message names


@dataclass
class ModelBundle:
    """A loaded model: its folder, its parsed model.json and its networks (eval mode, on the device)."""

    path: Path
    config: dict[str, Any]
    networks: dict[str, nn.Module]

    @property
    def kind(self) -> str:
        return self.config["kind"]

    def schedule(self) -> Any:
        """The noise schedule the networks were trained with (a schedule.Schedule), or None if not recorded."""
        from ..schedule import schedule_from_config

        return None if self.config["schedule"] is None else schedule_from_config(self.config["schedule"])


# ---------------------------------------------------------------------------------------------- saving


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_bundle_folder(path: Path) -> bool:
    try:
        return json.loads((path / CONFIG_NAME).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _json_scalar(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # numpy / torch scalars
        return value.item()
    raise TypeError(f"model.json values must be JSON types, got {type(value).__name__}: {value!r}")


def _to_json(config: dict[str, Any]) -> str:
    """model.json text; strict JSON (NaN/inf refused) so that every reader can parse it."""
    try:
        return json.dumps(config, indent=2, allow_nan=False, default=_json_scalar) + "\n"
    except ValueError as error:
        raise ValueError(f"model.json values must be finite numbers ({error})") from error


def _network_entry(name: str, network: nn.Module, folder: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    described = getattr(network, "network_config", None)
    if not isinstance(described, dict) or described.get("class") not in NETWORK_CLASSES:
        raise ValueError(f"network {name!r} must be a UNetModel/EncoderUNetModel built by build_network "
                         "(it carries network_config)")
    weights = folder / f"{name}.safetensors"
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in network.state_dict().items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return {"class": described["class"], "config": described["config"], "weights": weights.name,
            "sha256": _sha256(weights)}


def _replace_folder(built: Path, target: Path) -> None:
    """Move the finished folder into place; an existing bundle is set aside first and removed only after."""
    if not target.exists():
        os.replace(built, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    aside.rmdir()
    os.replace(target, aside)
    try:
        os.replace(built, target)
    except OSError:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def save_bundle(path: str | os.PathLike[str], networks: Mapping[str, nn.Module], *, kind: str,
                schedule: Mapping[str, Any] | Any | None = None, preprocessing: Mapping[str, Any] | None = None,
                labels: Mapping[str, Any] | None = None, calibration: Mapping[str, Any] | None = None,
                training: Mapping[str, Any] | None = None) -> Path:
    """Write a model bundle folder atomically (built next to ``path``, then renamed) and return its path.

    ``schedule`` is a Schedule.to_config() dict (a Schedule is converted). An existing bundle at ``path`` is
    replaced; any other existing file or non-empty folder is refused.
    """
    target = Path(path)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not networks:
        raise ValueError("a bundle needs at least one network")
    for name in networks:
        if not _NETWORK_NAME.match(name):
            raise ValueError(f"network name {name!r} must be letters, digits, '_' or '-' (it names a file)")
    if target.exists() and not (target.is_dir() and (_is_bundle_folder(target) or not any(target.iterdir()))):
        raise ModelError("exists and is not a model bundle; refusing to overwrite it", path=target,
                         fix="choose a new output folder")
    if schedule is not None and hasattr(schedule, "to_config"):
        schedule = schedule.to_config()
    if schedule is not None:
        from ..schedule import schedule_from_config

        schedule_from_config(schedule)  # a bundle that saves must load: refuse a bad schedule now
    target.parent.mkdir(parents=True, exist_ok=True)
    built = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        entries = {name: _network_entry(name, network, built) for name, network in networks.items()}
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "networks": entries,
                  "schedule": None if schedule is None else dict(schedule),
                  "preprocessing": dict(preprocessing or {}), "labels": dict(labels or {}),
                  "calibration": dict(calibration or {}), "training": dict(training or {}),
                  "created_by": f"diffusion-engine {__version__}"}
        (built / CONFIG_NAME).write_text(_to_json(config), encoding="utf-8")
        plain_permissions(built)
        _replace_folder(built, target)
    finally:
        shutil.rmtree(built, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------- loading


def _looks_pickled(path: Path) -> bool:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    with contextlib.suppress(OSError), path.open("rb") as stream:
        head = stream.read(4)
        return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"  # torch.save zip, or a raw pickle
    return False


def _bundle_folder(path: Path) -> Path:
    """The bundle folder for a user-given path, refusing files that are not bundles (and never opening pickles)."""
    if not path.exists():
        raise ModelError("model not found", path=path, fix="give the model folder that holds model.json")
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise ModelError(f"not a model bundle (no {CONFIG_NAME} in this folder)", path=path,
                             fix="give the folder written by training or by `diffusion-engine import-checkpoint`")
        return path
    if path.name == CONFIG_NAME:
        return path.parent
    if _looks_pickled(path):
        raise ModelError("this is a pickled PyTorch checkpoint; the engine never unpickles model files because "
                         "unpickling can run arbitrary code", path=path, fix=_IMPORT_HINT)
    if path.suffix == ".safetensors":
        raise ModelError("this is a bare weights file without its network config", path=path, fix=_IMPORT_HINT)
    raise ModelError("not a model bundle", path=path, fix="give the model folder that holds model.json")


def _read_config(folder: Path) -> dict[str, Any]:
    """Parse and check model.json (everything except the weights)."""
    config_path = folder / CONFIG_NAME
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ModelError(f"not a text file ({error})", path=config_path,
                         fix="restore model.json from the original model folder") from error
    except ValueError as error:
        raise ModelError(f"invalid JSON ({error})", path=config_path,
                         fix="restore model.json from the original model folder") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ModelError(f"not a diffusion-engine model (format {found!r}, expected {FORMAT!r})", path=config_path,
                         fix="give a model folder written by diffusion-engine")
    version = config.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ModelError(f"invalid format_version {version!r}", path=config_path,
                         fix="restore model.json from the original model folder")
    if version > FORMAT_VERSION:
        raise ModelError(f"made by a newer diffusion-engine (model format version {version}; this version "
                         f"{__version__} reads up to {FORMAT_VERSION})", path=config_path,
                         fix="upgrade diffusion-engine")
    if config.get("kind") not in KINDS:
        raise ModelError(f"unknown model kind {config.get('kind')!r}", path=config_path,
                         fix=f"the kind must be one of {', '.join(KINDS)}")
    networks = config.get("networks")
    if not isinstance(networks, dict) or not networks:
        raise ModelError("no networks listed", path=config_path, fix="restore model.json from the original model")
    for name, entry in networks.items():
        _check_entry(name, entry, config_path)
    _check_sections(config, config_path)
    return config


def _check_entry(name: str, entry: Any, config_path: Path) -> None:
    keys = ("class", "config", "weights", "sha256")
    if not isinstance(entry, dict) or any(key not in entry for key in keys):
        raise ModelError(f"network {name!r} must list {', '.join(keys)}", path=config_path,
                         fix="restore model.json from the original model folder")
    weights = entry["weights"]
    if (not isinstance(weights, str) or Path(weights).name != weights or weights in (".", "..")
            or not weights.endswith(".safetensors")):
        raise ModelError(f"network {name!r}: weights must be a .safetensors file name inside the model folder, "
                         f"got {weights!r}", path=config_path, fix="restore model.json from the original model")


def _check_sections(config: dict[str, Any], config_path: Path) -> None:
    from ..schedule import schedule_from_config

    for section in SECTIONS:
        config.setdefault(section, None if section == "schedule" else {})
        value = config[section]
        if section == "schedule" and value is not None:
            try:
                schedule_from_config(value)
            except (TypeError, ValueError) as error:
                raise ModelError(f"invalid schedule: {error}", path=config_path,
                                 fix="restore model.json from the original model folder") from error
        elif section != "schedule" and not isinstance(value, dict):
            raise ModelError(f"section {section!r} must be a JSON object", path=config_path,
                             fix="restore model.json from the original model folder")


def _listing(names: Iterable[str]) -> str:
    names = list(names)
    more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


def check_state_dict(network: nn.Module, tensors: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Refuse weights that do not fit ``network``: non-tensors, non-float tensors, missing/unexpected keys, shapes."""
    fix = "use the weights that belong to this network config (same class and constructor arguments)"
    not_tensors = [key for key, value in tensors.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ModelError(f"not a state dict: entries that are not tensors: {_listing(not_tensors)}", path=path,
                         fix=fix)
    not_float = [f"{key} ({value.dtype})" for key, value in tensors.items() if not value.dtype.is_floating_point]
    if not_float:
        raise ModelError(f"non-float tensors: {_listing(not_float)}", path=path, fix=fix)
    expected = network.state_dict()
    missing = [key for key in expected if key not in tensors]
    unexpected = [key for key in tensors if key not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    wrong = [f"{key} {list(tensors[key].shape)} (network expects {list(value.shape)})"
             for key, value in expected.items() if key in tensors and tensors[key].shape != value.shape]
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {_listing(wrong)}")
    if problems:
        raise ModelError("weights do not match the network config: " + "; ".join(problems), path=path, fix=fix)


def network_from_state(class_name: str, config: dict[str, Any], tensors: Mapping[str, torch.Tensor], *,
                       config_path: str | os.PathLike[str], weights_path: str | os.PathLike[str],
                       device: torch.device | str = "cpu") -> nn.Module:
    """Build a network (without a wasted random initialisation) and fill it with checked weights."""
    try:
        with torch.device("meta"):
            network = build_network(class_name, config)
    except ModelError as error:
        raise ModelError(error.problem, path=config_path, fix=error.fix) from error
    check_state_dict(network, tensors, weights_path)
    expected = network.state_dict()
    state = {key: value.to(dtype=expected[key].dtype) for key, value in tensors.items()}
    network.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in itertools.chain(network.parameters(), network.buffers())):
        raise RuntimeError(f"{class_name} has tensors outside its state dict; they cannot be built on 'meta'")
    return network.to(device).eval()


def _load_network(folder: Path, name: str, entry: dict[str, Any], device: torch.device | str) -> nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = folder / entry["weights"]
    if not weights.is_file():
        raise ModelError(f"weights file of network {name!r} is missing", path=weights,
                         fix="copy the complete model folder")
    if _sha256(weights) != entry["sha256"]:
        raise ModelError(f"weights of network {name!r} are corrupt or were changed (SHA-256 checksum mismatch)",
                         path=weights, fix="copy the model folder again from its source")
    try:
        tensors = load_file(str(weights), device="cpu")
    except SafetensorError as error:
        raise ModelError(f"not a valid safetensors file ({error})", path=weights,
                         fix="copy the model folder again from its source") from error
    return network_from_state(entry["class"], entry["config"], tensors, config_path=folder / CONFIG_NAME,
                              weights_path=weights, device=device)


def _load(path: str | os.PathLike[str], kind: str | None, device: torch.device | str,
          only: str | None = None) -> ModelBundle:
    folder = _bundle_folder(Path(path))
    config = _read_config(folder)
    if kind is not None and config["kind"] != kind:
        raise ModelError(f"wrong kind of model: this one is for {config['kind']!r}, this task needs {kind!r}",
                         path=folder, fix=f"give a model trained for {kind} (or re-import the checkpoint with "
                                          f"`diffusion-engine import-checkpoint --kind {kind}`)")
    entries = config["networks"]
    if only is not None and only not in entries:
        raise ModelError(f"the model has no network {only!r} (it has {', '.join(entries)})", path=folder,
                         fix=f"name one of {', '.join(entries)}")
    names = [only] if only is not None else list(entries)
    networks = {name: _load_network(folder, name, entries[name], device) for name in names}
    return ModelBundle(path=folder, config=config, networks=networks)


def load_bundle(path: str | os.PathLike[str], *, kind: str | None = None,
                device: torch.device | str = "cpu") -> ModelBundle:
    """Load and validate a model bundle; ``kind`` refuses a model made for another task."""
    return _load(path, kind, device)


DEMO_NAMES = (None, "demo")  # what --model means when it names the bundled demo model


def resolve_bundle(model: str | os.PathLike[str] | ModelBundle | None, kind: str, *, demo: Path, device: str = "cpu",
                   fix: str) -> ModelBundle:
    """A loaded ``kind`` bundle: None or "demo" is the bundled demo model in ``demo``; a folder is loaded onto
    ``device`` ("auto", "cpu", ...); an already loaded bundle is checked. ``fix`` tells the user what to pass when
    no demo model is bundled."""
    from ..devices import resolve_device

    if isinstance(model, ModelBundle):
        if model.kind != kind:
            raise ModelError(f"wrong kind of model: this one is for {model.kind!r}, this task needs {kind!r}",
                             path=model.path, fix=f"give a model trained with `diffusion-engine train {kind}`")
        return model
    if model in DEMO_NAMES:
        if not (demo / CONFIG_NAME).is_file():
            raise ModelError(f"the demo {kind} model is not bundled with this installation", path=demo, fix=fix)
        model = demo
    return for_inference(load_bundle(model, kind=kind, device=resolve_device(device)))


def for_inference(bundle: ModelBundle) -> ModelBundle:
    """The bundle's networks in their fastest inference layout: on the CPU, 2D convolutions in channels_last
    (``channels_last_convolutions``). Saving still works: weights are made contiguous when written."""
    for network in bundle.networks.values():
        weight = next(network.parameters(), None)
        if weight is not None and weight.device.type == "cpu":
            channels_last_convolutions(network)
    return bundle


def channels_last_convolutions(network: nn.Module) -> nn.Module:
    """2D convolution weights in channels_last, oneDNN's fastest CPU layout: 1.2-1.35x for the aging demo's UNet at
    64x64 on a 2-core EPYC, the same fp32 results up to the order of summation. Other layers are left alone."""
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            module.to(memory_format=torch.channels_last)
    return network


def load_model(path: str | os.PathLike[str], network: str | None = None, *,
               device: torch.device | str = "cpu") -> nn.Module:
    """The bundle's only network, or the one named ``network``: callable as ``net(x, t, y=None)``."""
    if network is None:
        folder = _bundle_folder(Path(path))
        names = list(_read_config(folder)["networks"])
        if len(names) > 1:
            raise ModelError(f"the model has several networks ({', '.join(names)})", path=folder,
                             fix="name the one to load")
        network = names[0]
    return _load(path, None, device, only=network).networks[network]


def read_bundle_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """model.json of a bundle, checked, without loading any weights."""
    return _read_config(_bundle_folder(Path(path)))


def update_bundle_config(path: str | os.PathLike[str], **sections: Any) -> None:
    """Atomically replace whole sections of model.json (schedule, preprocessing, labels, calibration, training)."""
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"cannot update {', '.join(unknown)}; updatable sections: {', '.join(SECTIONS)}")
    folder = _bundle_folder(Path(path))
    config = _read_config(folder)
    for section, value in sections.items():
        if value is not None and hasattr(value, "to_config"):
            value = value.to_config()
        config[section] = value if section == "schedule" else dict(value or {})
    _check_sections(config, folder / CONFIG_NAME)
    write_text_atomic(folder / CONFIG_NAME, _to_json(config))


# ---------------------------------------------------------------------------------------------- import


def _read_import_config(path: Path) -> tuple[str, dict[str, Any]]:
    fix = ('write it as {"class": "UNetModel" or "EncoderUNetModel", "kwargs": {...guided-diffusion constructor '
           'arguments...}}')
    if not path.is_file():
        raise ModelError("network config not found", path=path, fix=fix)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ModelError(f"invalid JSON ({error})", path=path, fix=fix) from error
    if not isinstance(config, dict) or set(config) != {"class", "kwargs"} or not isinstance(config["kwargs"], dict):
        raise ModelError("a network config needs exactly the keys 'class' and 'kwargs'", path=path, fix=fix)
    return config["class"], config["kwargs"]


def _unwrap_state_dict(loaded: Any, path: Path) -> dict[str, Any]:
    """The state dict inside a checkpoint: itself, or under 'ema'/'state_dict'/'model'; 'module.' stripped."""
    if not isinstance(loaded, dict):
        raise ModelError(f"holds a {type(loaded).__name__}, not a state dict", path=path,
                         fix="save the network's state_dict() (a dict of tensors)")
    for wrapper in ("ema", "state_dict", "model"):  # EMA weights are the ones to sample with
        if isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
            break
    keys = list(loaded)
    if keys and all(isinstance(key, str) and key.startswith("module.") for key in keys):
        loaded = {key[len("module."):]: value for key, value in loaded.items()}  # saved from DataParallel/DDP
    return loaded


def _read_weights(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelError("weights file not found", path=path, fix="give the checkpoint file to import")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as error:
            raise ModelError(f"not a valid safetensors file ({error})", path=path,
                             fix="download or copy the file again") from error
    import pickle

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)  # refuses anything but tensors/containers
    except pickle.UnpicklingError as error:
        raise ModelError("refused: the checkpoint holds Python objects other than tensors, and unpickling them "
                         "could run arbitrary code", path=path,
                         fix="in a trusted environment, save only the network weights "
                             "(torch.save(model.state_dict(), path) or safetensors) and import that file") from error
    except Exception as error:  # torch raises RuntimeError, EOFError, KeyError... for damaged files
        raise ModelError(f"cannot read the checkpoint ({type(error).__name__}: {str(error)[:200]})", path=path,
                         fix="check that the file is a complete PyTorch or safetensors checkpoint") from error
    return _unwrap_state_dict(loaded, path)


def import_guided_diffusion(weights: str | os.PathLike[str], config: str | os.PathLike[str],
                            out: str | os.PathLike[str], *, kind: str = "generic", network_name: str = "eps",
                            schedule: Mapping[str, Any] | None = None) -> Path:
    """Turn a guided-diffusion checkpoint (safetensors, or a state-dict .pt/.pth) into a model bundle."""
    if not _NETWORK_NAME.match(network_name):
        raise InputError(f"invalid network name {network_name!r}", fix="use letters, digits, '_' or '-'")
    if kind not in KINDS:
        raise InputError(f"invalid model kind {kind!r}", fix=f"use one of {', '.join(KINDS)}")
    weights_path, config_path = Path(weights), Path(config)
    class_name, kwargs = _read_import_config(config_path)
    tensors = _read_weights(weights_path)
    network = network_from_state(class_name, kwargs, tensors, config_path=config_path, weights_path=weights_path)
    training = {"imported_from": {"format": "guided-diffusion", "weights": weights_path.name,
                                  "sha256": _sha256(weights_path)}}
    return save_bundle(out, {network_name: network}, kind=kind, schedule=schedule, training=training)


def describe_bundle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-able summary of a bundle (loads and verifies the weights): kind, networks, sections."""
    bundle = load_bundle(path)
    networks = {}
    for name, network in bundle.networks.items():
        entry = bundle.config["networks"][name]
        networks[name] = {"class": entry["class"], "parameters": sum(p.numel() for p in network.parameters()),
                          "weights": entry["weights"], "config": entry["config"]}
    summary = {"path": str(bundle.path), "kind": bundle.kind, "format_version": bundle.config["format_version"],
               "created_by": bundle.config.get("created_by"), "networks": networks}
    summary.update({section: bundle.config[section] for section in SECTIONS})
    return summary
