"""benchmarks/gpu_run.sh, the one-command GPU run, smoke-tested on the CPU with the tiny config: the stages run in
order, each appends its tables and JSON to the few output files, and with no budget left every stage is skipped
with a line saying so (the compile probe and the compiled reference have their own smoke tests in
test_benchmarks_smoke.py, as bench.py's throughput has, and fused_kernels.py in test_kernels_smoke.py; they are
switched off here to keep this test short)."""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO

pytest.importorskip("diffusers")


def _gpu_run(tmp_path, name: str, **env) -> tuple[str, str]:
    out = tmp_path / name
    settings = dict(PY=sys.executable, OUT=str(out), CKPT=str(tmp_path / "ckpt"), CKPT_SIZE="small", DEVICE="cpu",
                    DTYPE="fp32", SIZE="64", STEPS="1", STEP_REPEATS="1", E2E_REPEATS="1", DECODE_REPEATS="1",
                    BENCH_ARGS="--threads 1 --warmup 0 --step-warmup 0", KERNELS="0", THROUGHPUT="0", PROBE="0", REF_COMPILED="0",
                    BREAKDOWN="0", OTHER_TASKS="0", MEMORY="0")
    settings.update(env)
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_run.sh")], capture_output=True, text=True,
                       timeout=300, env={**os.environ, **settings})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(f.name for f in out.iterdir()) == ["results.jsonl", "results.md", "run.log"]
    return (out / "results.md").read_text(), (out / "results.jsonl").read_text()


def test_gpu_run_stages_on_cpu(tmp_path):
    md, jsonl = _gpu_run(tmp_path, "out", BUDGET_S="100000")
    lines = [json.loads(line) for line in jsonl.splitlines()]
    assert [(x["stage"], x["status"]) for x in lines] == [("speed", "done")]
    speed = lines[0]["result"]["tasks"]["text_to_image"]["impls"]
    assert set(speed) == {"ours eager", "ours graphs", "ours kernels", "ours default", "ours default+kv_per_step",
                          "diffusers eager"}
    assert all(x["step_s"] > 0 and x["e2e_s"] > 0 and x["decode_s"] > 0 for x in speed.values())
    assert "## speed: done" in md and "end to end vs diffusers eager" in md

    # no budget left: the checkpoint is there, every stage is skipped with its reason, the compiled reference's
    # mode falls back first
    md, jsonl = _gpu_run(tmp_path, "none", BUDGET_S="0", KERNELS="1", THROUGHPUT="1", REF_COMPILED="1")
    assert jsonl == ""
    for name in ("kernels", "speed", "throughput", "reference_compiled"):
        assert f"## {name}: skipped (expects about" in md
    assert "mode reduce-overhead instead" in md
