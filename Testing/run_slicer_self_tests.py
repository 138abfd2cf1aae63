"""Run the modules' self-tests inside 3D Slicer and exit with a status CI can read.

    Slicer --no-main-window --testing --additional-module-paths DiffusionAnomaly DiffusionAging \
        --python-script Testing/run_slicer_self_tests.py
"""

import traceback

import slicer

status = 0
for name in ("DiffusionAnomaly", "DiffusionAging"):
    try:
        slicer.selfTests[name]()
        print(f"{name}: self-test passed")
    except Exception:
        traceback.print_exc()
        print(f"{name}: self-test FAILED")
        status = 1
slicer.util.exit(status)
