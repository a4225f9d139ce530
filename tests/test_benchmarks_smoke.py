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


def test_step_breakdown(ckpt, tmp_path):
    """step_breakdown.py off CUDA: kernel kinds add up to the total, every variant ran or named its error, and the
    whole call is split into parts that add up."""
    out = tmp_path / "breakdown.json"
    _run(BENCHMARKS / "step_breakdown.py", ckpt, "--device", "cpu", "--size", "64", "--steps", "1", "--repeats", "1",
         "--profile-calls", "1", "--json", out)
    r = json.loads(out.read_text())
    kernels = r["kernels"]
    assert kernels["total_ms"] > 0 and kernels["kinds"]["convolution"]["ms"] > 0
    assert sum(v["ms"] for v in kernels["kinds"].values()) == pytest.approx(kernels["total_ms"])
    assert set(r["variants"]) == {"default", "sdpa flash_attention", "sdpa efficient_attention",
                                  "sdpa cudnn_attention", "group_norm channels-last"}
    assert r["variants"]["default"]["rel_diff"] == 0
    assert r["variants"]["group_norm channels-last"]["rel_diff"] < 1e-5
    assert all("step_ms" in v or v["error"] for v in r["variants"].values())
    e = r["e2e_ms"]
    assert e["total"] == pytest.approx(e["unet_steps"] + e["vae_decode"] + e["rest"])


def test_group_norm_channels_last_variant_is_group_norm():
    """The GroupNorm that step_breakdown.py tries on the GPU equals torch's, on a channels-last input (float64)."""
    group_norm_channels_last = _script("step_breakdown").group_norm_channels_last
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 12, eps=1e-6).double()
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = (torch.randn(2, 12, 5, 7, dtype=torch.float64) * 3 + 1).to(memory_format=torch.channels_last)
    out = group_norm_channels_last(norm, x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, norm(x.contiguous()), rtol=1e-12, atol=1e-12)
