"""benchmarks/fused_kernels.py runs end to end on the CPU (tiny shapes, Triton's interpreter, which the script turns
on itself for --device cpu): every kind of call timed and equal to torch's, both GroupNorm candidates totalled, the
models with and without the kernels equal. No timing assertions."""

import json
import subprocess
import sys

import triton  # noqa: F401  (the script needs it; no triton is a failure here, not a skip)

from helpers import REPO


def test_kernels_benchmark_smoke(tmp_path):
    out_json, out_md = tmp_path / "kernels.json", tmp_path / "kernels.md"
    p = subprocess.run([sys.executable, REPO / "benchmarks" / "fused_kernels.py", "--device", "cpu", "--repeats", "1",
                        "--limit", "2", "--candidates", "2048:1:4:1,8192:1:8", "--json", out_json, "--markdown", out_md],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out_json.read_text())
    kinds = {(row["model"], row["kind"]) for row in r["shapes"]}
    assert kinds == {("unet", "group_norm"), ("unet", "geglu"), ("unet", "add_layer_norm"), ("vae", "group_norm")}
    assert all(row["fused_ms"] > 0 and row["torch_ms"] > 0 and row["rel_diff"] < 1e-5 for row in r["shapes"])
    assert {row["shift"] for row in r["shapes"] if row["kind"] == "group_norm"} == {False, True}
    for totals in r["candidate_totals"].values():
        assert set(totals) == {"2048:1:4:1", "8192:1:8"} and min(totals.values()) > 0
    m = r["models"]
    assert m["step_rel_diff"] < 1e-5 and m["decode_rel_diff"] < 1e-5 and m["kernels"]["step_ms"] > 0
    assert "fastest GroupNorm candidate for the unet" in p.stdout and "| kernels |" in out_md.read_text()
