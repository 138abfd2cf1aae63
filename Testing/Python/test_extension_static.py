"""Static checks of the Slicer extension that need neither Slicer nor slicer-core (plain CI).

- every SlicerParameterName in a module's .ui is a field of its parameter node, and every field has a widget;
- every `self.ui.<name>` the module uses exists in its .ui;
- CMake lists every Python file and resource of each module (else Slicer does not package it), and nothing more;
- module and Lib files import nothing outside the standard library at file scope except what Slicer provides
  (slicer, vtk, qt, ctk) and their own Lib packages; no shell=True anywhere;
- the extension's metadata: category not "Diffusion" (that means diffusion-weighted MRI), depends on PyTorch.
"""

from __future__ import annotations

import ast
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = ("DiffusionAnomaly", "DiffusionAging")
SLICER_PROVIDED = {"slicer", "vtk", "qt", "ctk", "__future__"}
OWN_LIBS = {"DiffusionAnomalyLib", "DiffusionAgingLib"}


def _module_dir(module: str) -> Path:
    folder = ROOT / module
    if not (folder / f"{module}.py").is_file():
        pytest.skip(f"{module} is not in this checkout")
    return folder


def _parameter_fields(module: str) -> set[str]:
    tree = ast.parse((_module_dir(module) / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list):
            return {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError(f"{module}.py has no @parameterNodeWrapper class")


def _ui(module: str) -> ET.Element:
    return ET.parse(_module_dir(module) / "Resources" / "UI" / f"{module}.ui").getroot()


def _ui_parameter_names(module: str) -> dict[str, str]:
    names = {}
    for widget in _ui(module).iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                names[widget.get("name")] = prop.findtext("string")
    return names


@pytest.mark.parametrize("module", MODULES)
def test_ui_parameter_names_match_the_parameter_node(module: str) -> None:
    fields = _parameter_fields(module)
    bound = _ui_parameter_names(module)
    unknown = {widget: name for widget, name in bound.items() if name not in fields}
    assert not unknown, f"SlicerParameterName without a parameter-node field: {unknown}"
    assert fields == set(bound.values()), f"fields without a widget: {sorted(fields - set(bound.values()))}"


SHARED_WIDGET = ROOT / "DiffusionAnomaly" / "DiffusionAnomalyLib" / "widget.py"  # both modules' Widget base


@pytest.mark.parametrize("module", MODULES)
def test_every_ui_widget_the_module_uses_exists(module: str) -> None:
    source = (_module_dir(module) / f"{module}.py").read_text() + SHARED_WIDGET.read_text()
    assert "(EngineJobWidget)" in source
    used = set(re.findall(r"self\.ui\.([A-Za-z_]\w*)", source))
    # names built at run time, e.g. getattr(self.ui, f"inputVolume{index + 1}Selector")
    for pattern in re.findall(r'getattr\(self\.ui, f"([^"]+)"\)', source):
        regex = re.sub(r"\{[^}]*\}", r"\\d+", pattern)
        used.add(("regex", regex))
    names = {w.get("name") for w in _ui(module).iter("widget")}
    for item in used:
        if isinstance(item, tuple):
            assert any(re.fullmatch(item[1], n) for n in names), f"no widget matches {item[1]}"
        else:
            assert item in names, f"{module}.py uses self.ui.{item}, which is not in {module}.ui"


def _cmake_list(text: str, variable: str, module: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not found"
    return [entry.replace("${MODULE_NAME}", module) for entry in match.group(1).split()]


@pytest.mark.parametrize("module", MODULES)
def test_cmake_lists_every_script_and_resource(module: str) -> None:
    folder = _module_dir(module)
    cmake = (folder / "CMakeLists.txt").read_text()
    assert f"set(MODULE_NAME {module})" in cmake
    assert "slicerMacroBuildScriptedModule" in cmake and "WITH_GENERIC_TESTS" in cmake
    scripts = _cmake_list(cmake, "MODULE_PYTHON_SCRIPTS", module)
    on_disk = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.py") if "Testing" not in p.parts)
    assert sorted(scripts) == on_disk
    resources = _cmake_list(cmake, "MODULE_PYTHON_RESOURCES", module)
    resources_on_disk = sorted(str(p.relative_to(folder)) for p in (folder / "Resources").rglob("*") if p.is_file())
    assert sorted(resources) == resources_on_disk


def _top_level_imports(path: Path) -> set[str]:
    roots = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("module", MODULES)
def test_file_scope_imports_are_stdlib_or_slicer(module: str) -> None:
    folder = _module_dir(module)
    for path in folder.rglob("*.py"):
        if "Testing" in path.parts:
            continue
        foreign = {name for name in _top_level_imports(path)
                   if name not in sys.stdlib_module_names and name not in SLICER_PROVIDED | OWN_LIBS}
        assert not foreign, f"{path.relative_to(ROOT)} imports {sorted(foreign)} at file scope"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "shell":
                assert isinstance(node.value, ast.Constant) and node.value.value is False, f"shell=True in {path}"


def test_extension_metadata() -> None:
    cmake = (ROOT / "CMakeLists.txt").read_text()
    category = re.search(r'set\(EXTENSION_CATEGORY "([^"]+)"\)', cmake).group(1)
    assert "diffusion" not in category.lower()
    assert re.search(r'set\(EXTENSION_DEPENDS "?PyTorch"?\)', cmake)
    assert not re.search(r"project\(Slicer", cmake)
    for module in MODULES:
        assert f"add_subdirectory({module})" in cmake
    assert "include(${Slicer_EXTENSION_CPACK})" in cmake and (ROOT / "LICENSE").is_file()
