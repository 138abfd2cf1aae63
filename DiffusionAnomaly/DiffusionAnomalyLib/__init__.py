"""Slicer glue shared by the DiffusionAnomaly and DiffusionAging modules (Qt-free except dependencies.py).

engine.py   run the engine subprocess, stream its progress, cancel and kill its process tree
jobs.py     a module run: nodes -> temporary files -> engine -> results into the scene
nodes.py    node <-> file exchange with exact geometry; output-node bookkeeping, Subject Hierarchy, tables
models.py   which model folder to run and what the panel needs from its model.json
dependencies.py  first-run installation of torch (PyTorchUtils) and the engine's packages (Slicer only)
sample_data.py  the engine's demo cases as Sample Data buttons (registered at application start-up)
anomaly.py  DiffusionAnomaly's logic
"""
