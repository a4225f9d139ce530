"""benchmarks/kernel_variants.py finds the Triton kernel variants the CUDA fast path compiles on a first run
(full-size networks on the meta device) and compiles them for an H100 without a GPU, in a fresh process without
Triton's interpreter. No timing assertions."""

import json
import os
import subprocess
import sys

import triton  # noqa: F401  (the script needs it; no triton is a failure here, not a skip)

from helpers import REPO


def _run(tmp_path, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")} | {"TRITON_CACHE_DIR": str(tmp_path)}
    out = tmp_path / "variants.json"
    p = subprocess.run([sys.executable, "-W", "error::UserWarning", REPO / "benchmarks" / "kernel_variants.py",
                        *args, "--json", out], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text())


def test_flows_that_share_shapes_share_variants(tmp_path):
    """Each kernel variant depends on shapes and layouts, not on the tokens: image variation and dual guidance run
    text-to-image's variants, text variation image-to-text's."""
    r = _run(tmp_path, "--no-compile")
    new = r["new_per_stage"]
    assert new["probe"] == 2 and new["text_to_image"] > 0 and new["image_to_text"] > 0 and new["encode"] > 0
    assert new["image_variation"] == new["dual_guided"] == new["text_variation"] == 0
    assert r["variants"] == sum(new.values()) == sum(r["per_kernel"].values())
    assert set(r["per_kernel"]) == {"_chunk_moments", "_normalize", "_geglu", "_add_layer_norm"}


def test_variants_compile_for_h100_without_a_default_left_to_triton(tmp_path):
    """Every launch names its options (vd.kernels.common.LAUNCH_OPTIONS): Triton 3.9 warns when it has to pick
    the fused multiply-add default itself, which this run treats as an error."""
    r = _run(tmp_path, "--size", "64", "--stages", "probe", "encode")
    assert r["variants"] == sum(r["new_per_stage"].values()) > 2
    assert r["compile_s"] > 0 and set(r["compile_s_per_stage"]) == {"probe", "encode"}
