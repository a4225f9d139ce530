"""200 mixed calls in one process: resident memory at the end within 5% of after the first 20 calls."""

import json
import subprocess
import sys

import pytest

import tiny_pipeline as tp
from helpers import REPO

pytest.importorskip("diffusers")
SCRIPT = REPO / "benchmarks" / "soak.py"


@pytest.mark.slow
def test_soak_memory_is_flat(tmp_path):
    model = tp.save(tp.build_components(seed=0), tmp_path / "vd")
    done = subprocess.run([sys.executable, str(SCRIPT), str(model), "--calls", "200", "--steps", "1", "--size", "32"], capture_output=True,
                          text=True, timeout=600)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0, report
    assert report["ratio"] <= 1.05
