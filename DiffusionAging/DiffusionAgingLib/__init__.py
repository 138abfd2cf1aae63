"""DiffusionAging's logic (aging.py). The shared Slicer glue (engine subprocess, node exchange, model folders) is
imported from DiffusionAnomalyLib, which the DiffusionAnomaly module installs next to this package."""
