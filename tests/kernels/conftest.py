"""The kernel tests run the Triton kernels on the CPU in Triton's interpreter. Whether a kernel is interpreted is
decided when it is defined, so the switch is set here, before any test module imports triton or vd.kernels; no
other test folder imports them, so the rest of the suite runs as before. A missing triton fails these tests."""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
if "vd.kernels.group_norm" in sys.modules:
    raise RuntimeError("vd.kernels was imported before tests/kernels/conftest.py could turn on Triton's interpreter")
