"""The kernels compile for an H100 (sm_90) without a GPU (tests/kernels/compile_for_h100.py, in a fresh process
without the interpreter): the interpreter runs the kernels' Python but not Triton's compiler. The activations
are read (and, where a kernel writes one, written) in 16-byte vectors: along NCHW pixels, GEGLU and LayerNorm
rows, and channels-last rows of whole groups. That needs the sizes' divisibility by 16 to reach the compiler (a
size marked do_not_specialize made every load 2 bytes), and in channels-last memory a program that reads more
than one group's C/G channels (one group of 10 fp16 channels is 20 bytes: 2-byte loads and stores)."""

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
        loads, stores = (part.split() for part in info.removeprefix("global loads ").split(" stores "))
        assert "v4" in loads, f"{name}: {info}"
        if not name.startswith("chunk_moments"):  # which writes only its partial moments
            assert "v4" in stores, f"{name}: {info}"
