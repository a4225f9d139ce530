"""The benchmark scripts run end to end on CPU with a tiny random checkpoint (no timing assertions).

benchmarks/make_checkpoint.py writes the checkpoint; benchmarks/bench.py and benchmarks/load_rss.py run as the
user runs them, in subprocesses, with one step, one repeat and 64x64 images.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TASKS = ("text_to_image", "image_variation", "dual_guided")
TINY = ["--device", "cpu", "--dtype", "fp32", "--size", "64", "--steps", "1", "--step-repeats", "1",
        "--e2e-repeats", "1", "--warmup", "0", "--step-warmup", "0", "--threads", "1"]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str) -> str:
    p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "ckpt"
    return _script("make_checkpoint").write(out, "small", torch.float32, "cpu")


def test_checkpoint_is_a_diffusers_folder(ckpt):
    for component in ("image_unet", "text_unet", "vae"):
        assert (ckpt / component / "diffusion_pytorch_model.safetensors").is_file()
    for component in ("text_encoder", "image_encoder"):
        assert (ckpt / component / "model.safetensors").is_file()
    for f in ("model_index.json", "scheduler/scheduler_config.json", "image_feature_extractor/preprocessor_config.json",
              "tokenizer/vocab.json", "tokenizer/merges.txt", "pretrained_pth/optimus-vae.pth",
              "optimus_tokenizer/vocab.txt", "optimus_tokenizer/vocab.json", "optimus_tokenizer/merges.txt"):
        assert (ckpt / f).is_file(), f


def test_flows_run(ckpt, tmp_path):
    """The flows only we have, timed by flows_run.py: every output finite, one row per flow in the JSON."""
    out = tmp_path / "flows.json"
    _run(BENCHMARKS / "flows_run.py", ckpt, "--device", "cpu", "--steps", "2", "--size", "64", "--repeats", "1",
         "--json", out)
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"image_to_text", "text_variation", "image_variation",
                                      "image_variation focus 0.2, fidelity 0.5, color_adjust",
                                      "blend 2 images (one masked) + text 0.3"}
    assert all(r["seconds"] > 0 for r in result["results"].values())
    from transformers import CLIPTokenizer
    ids = CLIPTokenizer.from_pretrained(ckpt / "tokenizer")("a cat", padding="max_length", max_length=77).input_ids
    vocab = json.loads((ckpt / "text_encoder" / "config.json").read_text())["vocab_size"]
    assert len(ids) == 77 and max(ids) < vocab


def test_bench_all_tasks(ckpt, tmp_path):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    _run(BENCHMARKS / "bench.py", ckpt, *TINY, "--no-isolate", "--profile", tmp_path / "prof",
         "--json", out_json, "--markdown", out_md)
    result = json.loads(out_json.read_text())
    assert set(result["tasks"]) == set(TASKS)
    for task in TASKS:
        r = result["tasks"][task]
        assert "error" not in r, r
        for impl in ("ours", "reference"):
            assert r[impl]["step_s"] > 0 and r[impl]["e2e_s"] > 0 and r[impl]["finite"]
        # both implementations do the same work, counted
        assert r["ours"]["step_flops"] == r["reference"]["step_flops"] > 0
        assert r["ours"]["max_abs_diff"] <= 1e-3
        assert (tmp_path / "prof" / f"{task}-ours.txt").is_file()
    md = out_md.read_text()
    assert md.count("| text_to_image |") == 2 and "ours/ref" in md  # the speed and the work table
    for env_key in ("device", "date", "versions"):
        assert result["env"][env_key]


def test_bench_isolated_memory_and_load(ckpt, tmp_path):
    out_json = tmp_path / "bench.json"
    stdout = _run(BENCHMARKS / "bench.py", ckpt, *TINY, "--tasks", "dual_guided", "--ref-variants", "dedicated",
                  "--json", out_json)
    runs = json.loads(out_json.read_text())["memory"]["dual_guided"]
    assert set(runs) == {"ours", "dedicated"}
    for r in runs.values():
        assert r["load_s"] > 0 and r["rss_peak"] >= r["rss_load"] > 0
    assert "| dual_guided | task pipeline, remove_unused_weights() |" in stdout


def test_load_rss(ckpt, tmp_path):
    out_json = tmp_path / "rss.json"
    stdout = _run(BENCHMARKS / "load_rss.py", ckpt, "--tasks", "text_to_image", "--no-reference", "--json", out_json)
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["what"] for r in rows] == ["text_to_image"]
    assert rows[0]["rss_touched"] >= rows[0]["rss_load"] > 0 and rows[0]["params"] > 0
    assert "| ours, tasks=[text_to_image] |" in stdout
