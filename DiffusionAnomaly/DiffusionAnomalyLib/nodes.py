"""MRML nodes <-> files for the engine, and the bookkeeping of a module's output nodes. Shared by both modules.

Qt-free: it needs only the MRML classes (Slicer, or the slicer-core wheel), vtk and numpy (imported inside the
functions, as Slicer modules must not import non-stdlib packages at file scope).

Geometry: a volume is written with its exact IJK-to-RAS (NRRD keeps oblique and left-handed directions). The engine
writes its outputs on the same voxel grid. Slicer's reader turns a left-handed grid into a right-handed one by
reversing an axis, so a file is never read straight into an output node: its voxels are mapped back onto the input's
index grid (a checked signed axis permutation, no interpolation) and the output gets the input's matrix verbatim.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import slicer
import vtk

GRID_TOLERANCE = 1e-3  # in voxels: how far an output's voxel centres may lie from the input's
OWNER_ATTRIBUTE = "DiffusionModels.Owner"  # "<module>:<input node id>"
ROLE_ATTRIBUTE = "DiffusionModels.Role"


class GeometryMismatch(Exception):
    """An engine output does not lie on the input's voxel grid."""


# ------------------------------------------------------------------------------------------------ geometry


def ijk_to_ras(node: Any) -> Any:
    """The node's IJK-to-RAS matrix as a 4x4 numpy array."""
    import numpy as np

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def grid_mapping(reference: Any, other: Any, reference_shape: Sequence[int], other_shape: Sequence[int]
                 ) -> tuple[list[int], list[bool]]:
    """How the voxels of a grid ``other`` sit on the grid ``reference`` (4x4 IJK-to-RAS, shapes in i, j, k order).

    Returns (axes, flips): reference axis a is other axis axes[a], reversed where flips[a]. Raises GeometryMismatch
    unless every voxel centre of one grid is a voxel centre of the other.
    """
    import numpy as np

    index_map = np.linalg.solve(other, reference)  # reference index -> other index
    linear, offset = index_map[:3, :3], index_map[:3, 3]
    rounded = np.rint(linear)
    signed_permutation = (np.abs(rounded).sum(axis=0) == 1).all() and (np.abs(rounded).sum(axis=1) == 1).all()
    if not signed_permutation or np.abs(linear - rounded).max() > GRID_TOLERANCE:
        raise GeometryMismatch("the output's voxel axes are not the input's (up to order and direction)")
    axes, flips = [], []
    for a in range(3):
        b = int(np.flatnonzero(rounded[:, a])[0])
        flip = rounded[b, a] < 0
        expected = reference_shape[a] - 1 if flip else 0
        if other_shape[b] != reference_shape[a] or abs(offset[b] - expected) > GRID_TOLERANCE:
            raise GeometryMismatch(f"the output covers a different extent along axis {'IJK'[a]}")
        axes.append(b)
        flips.append(bool(flip))
    return axes, flips


def array_on_reference_grid(array: Any, matrix: Any, reference_matrix: Any, reference_shape_kji: Sequence[int]) -> Any:
    """Re-index a [k, j, i] voxel array read with IJK-to-RAS ``matrix`` onto the reference grid (exact)."""
    import numpy as np

    volume_ijk = np.asarray(array).transpose(2, 1, 0)
    reference_ijk = tuple(reversed(reference_shape_kji))
    axes, flips = grid_mapping(reference_matrix, matrix, reference_ijk, volume_ijk.shape)
    aligned = volume_ijk.transpose(axes)
    for axis, flip in enumerate(flips):
        if flip:
            aligned = np.flip(aligned, axis=axis)
    return np.ascontiguousarray(aligned.transpose(2, 1, 0))


# ------------------------------------------------------------------------------------------------ files


def write_volume(node: Any, path: str | os.PathLike[str]) -> Path:
    """Write a volume node's voxels and exact geometry (no parent transform) to NRRD, leaving the node untouched."""
    if node is None or node.GetImageData() is None:
        raise ValueError(f"volume {getattr(node, 'GetName', lambda: '?')()} has no voxels to write")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetWriteFileFormat("nrrd")
    storage.SetUseCompression(False)  # a temporary file: speed over size
    if not storage.WriteData(node):
        raise OSError(f"could not write {node.GetName()} to {path}")
    return Path(path)


def read_volume_array(path: str | os.PathLike[str], reference: Any) -> Any:
    """The voxels of an image file written on ``reference``'s grid, as a [k, j, i] array in reference's indices."""
    scene = slicer.vtkMRMLScene()  # a private scene: nothing appears in the user's scene while reading
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    storage.SetCenterImage(0)
    if not storage.ReadData(node):
        raise OSError(f"could not read {path}")
    array = slicer.util.arrayFromVolume(node).copy()
    reference_shape = slicer.util.arrayFromVolume(reference).shape
    return array_on_reference_grid(array, ijk_to_ras(node), ijk_to_ras(reference), reference_shape)


# ------------------------------------------------------------------------------------------------ output nodes


def owner_tag(module: str, input_node: Any) -> str:
    return f"{module}:{input_node.GetID()}"


def find_output(scene: Any, module: str, input_node: Any, role: str | None, class_name: str = "vtkMRMLNode") -> Any:
    """The output node with this role (None: any) that ``module`` made earlier for ``input_node``, or None."""
    owner = owner_tag(module, input_node)
    for index in range(scene.GetNumberOfNodesByClass(class_name)):
        node = scene.GetNthNodeByClass(index, class_name)
        if node.GetAttribute(OWNER_ATTRIBUTE) == owner and role in (None, node.GetAttribute(ROLE_ATTRIBUTE)):
            return node
    return None


def output_node(scene: Any, module: str, input_node: Any, role: str, class_name: str, name: str) -> Any:
    """Reuse this module's earlier output for the input (so a re-run replaces it), else add a new node."""
    node = find_output(scene, module, input_node, role, class_name)
    if node is None:
        node = add_node(scene, class_name, name)
        node.SetAttribute(OWNER_ATTRIBUTE, owner_tag(module, input_node))
        node.SetAttribute(ROLE_ATTRIBUTE, role)
    else:
        node.SetName(name)
    return node


def add_node(scene: Any, class_name: str, name: str) -> Any:
    """scene.AddNewNodeByClass, registering the class first where no module logic did (plain slicer-core scenes)."""
    node = scene.AddNewNodeByClass(class_name, name)
    if node is None and hasattr(slicer, class_name):
        scene.RegisterNodeClass(getattr(slicer, class_name)())
        node = scene.AddNewNodeByClass(class_name, name)
    if node is None:
        raise RuntimeError(f"this scene cannot create {class_name} nodes")
    return node


def remove_outputs(scene: Any, module: str, input_node: Any, roles: Iterable[str] | None) -> None:
    """Remove this module's outputs for the input with these roles (None: all of them)."""
    for role in [None] if roles is None else roles:
        while (node := find_output(scene, module, input_node, role)) is not None:
            scene.RemoveNode(node)


def set_volume(node: Any, array: Any, reference: Any) -> None:
    """Fill a scalar volume node with a [k, j, i] array on the reference's exact grid (matrix copied verbatim)."""
    slicer.util.updateVolumeFromArray(node, array)
    node.CopyOrientation(reference)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()


def use_color(display_node: Any, color_node_id: str) -> bool:
    """Show with a Slicer colour table (e.g. Inferno) when the scene has it (slicer-core scenes have none)."""
    scene = display_node.GetScene()
    if scene is None or scene.GetNodeByID(color_node_id) is None:
        return False
    display_node.SetAndObserveColorNodeID(color_node_id)
    return True


def place_like(node: Any, reference: Any) -> None:
    """Put an output where the user expects it: under the input's study (Subject Hierarchy), same transform."""
    if node.IsA("vtkMRMLTransformableNode"):
        node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
    scene = reference.GetScene()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return
    invalid = hierarchy.GetInvalidItemID()
    reference_item = hierarchy.GetItemByDataNode(reference)
    parent = hierarchy.GetItemParent(reference_item) if reference_item != invalid else invalid
    if parent == invalid:
        parent = hierarchy.GetSceneItemID()
    item = hierarchy.GetItemByDataNode(node)
    if item == invalid:
        hierarchy.CreateItem(parent, node)
    else:
        hierarchy.SetItemParent(item, parent)


def fill_table(table_node: Any, columns: Sequence[tuple[str, Sequence[Any]]]) -> None:
    """Replace a table node's content: one (name, values) per column; numbers become double columns."""
    table = vtk.vtkTable()
    for name, values in columns:
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        column = vtk.vtkDoubleArray() if numeric else vtk.vtkStringArray()
        column.SetName(name)
        for value in values:
            column.InsertNextValue(float(value) if numeric else str(value))
        table.AddColumn(column)
    table_node.SetAndObserveTable(table)
