"""The kernel tests run the Triton kernels on the CPU in Triton's interpreter. Whether a kernel is interpreted is
decided when it is defined, so tests/conftest.py turns the interpreter on before any test module is imported
(diffusers, transformers or torch.compile may import triton from any of them); this checks it held, and sets it
for a run of this folder alone. A missing triton fails these tests."""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
if "vd.kernels.group_norm" in sys.modules:
    raise RuntimeError("vd.kernels was imported before tests/kernels/conftest.py could turn on Triton's interpreter")
