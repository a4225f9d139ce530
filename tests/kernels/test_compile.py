"""The kernels compile for an H100 (sm_90) without a GPU (tests/kernels/compile_for_h100.py, in a fresh process
without the interpreter): the interpreter runs the kernels' Python but not Triton's compiler. Where the memory
is contiguous (NCHW pixels, GEGLU rows) the loads are 16-byte vectors, which needs the sizes' divisibility by 16
to reach the compiler (a size marked do_not_specialize made every load 2 bytes)."""

import os
import subprocess
import sys

import triton  # noqa: F401  (no triton is a failure here, not a skip)

from helpers import TESTS


def test_kernels_compile_for_h100(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    p = subprocess.run([sys.executable, TESTS / "kernels" / "compile_for_h100.py"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in p.stdout.splitlines())
    assert len(lines) == 14, p.stdout
    for name, info in lines.items():
        if "nchw" in name or name in ("geglu", "add_layer_norm"):
            assert "v4" in info.split(), f"{name}: {info}"
