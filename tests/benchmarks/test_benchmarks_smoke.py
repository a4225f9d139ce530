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
from helpers import REPO

pytest.importorskip("diffusers")

BENCHMARKS = REPO / "benchmarks"
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
         "--throughput-batches", "2", "--throughput-repeats", "1", "--json", out_json, "--markdown", out_md)
    result = json.loads(out_json.read_text())
    assert set(result["tasks"]) == set(TASKS)
    for task in TASKS:
        r = result["tasks"][task]
        assert "error" not in r, r
        ours, ref = r["impls"]["ours default"], r["impls"]["diffusers eager"]
        for x in (ours, ref):
            assert x["step_s"] > 0 and x["e2e_s"] > 0 and x["decode_s"] > 0 and x["finite"]
        # a whole (1-step) call does the same work, counted; our step leaves out the cross-attention keys and values
        # of the call's fixed context, which it computes once per call
        assert ours["e2e_flops"] == ref["e2e_flops"] > 0
        assert 0 < ours["step_flops"] < ref["step_flops"]
        assert ours["max_abs_diff"] <= 1e-3
        assert ours["decode_max_abs_diff"] <= 1e-5  # the same VAE weights in float32 (measured: 0)
        assert ours["decode_candidates"]["rel_diff"] < 1e-5  # the VAE channels-last (measured: 7.6e-7)
        assert (tmp_path / "prof" / f"{task}-ours_default.txt").is_file()
        row = r["throughput"]["2"]  # two images per call
        assert set(row) == {"ours default", "diffusers eager"}
        assert all(x["images_per_s"] > 0 and x["first_call_s"] > 0 for x in row.values())
    md = out_md.read_text()  # the tables for RESULTS.md: written, and about every task
    assert all(task in md for task in TASKS)
    for env_key in ("device", "date", "versions"):
        assert result["env"][env_key]


def test_bench_compiled_reference(ckpt, tmp_path):
    """diffusers' documented speed-up recipe on its text_to_image pipeline (traced with dynamo's eager backend: the
    full graph, no code generation) beside the eager reference and two of our variants."""
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    _run(BENCHMARKS / "bench.py", ckpt, *TINY, "--no-isolate", "--tasks", "text_to_image", "--ours", "eager",
         "default", "--reference", "eager", "compiled", "--ref-compile-backend", "eager", "--json", out_json,
         "--markdown", out_md)
    r = json.loads(out_json.read_text())["tasks"]["text_to_image"]
    assert "error" not in r, r
    recipe = r["reference_compiled"]
    assert recipe["failed"] == {}
    assert "image_unet.fuse_qkv_projections()" in recipe["applied"] and any(
        "fullgraph=True" in step for step in recipe["applied"])
    compiled = r["impls"]["diffusers compiled"]
    assert compiled["step_s"] > 0 and compiled["e2e_s"] > 0 and compiled["decode_s"] > 0
    assert compiled["max_abs_diff"] <= 1e-3  # fused projections and channels-last: other rounding (measured 8.8e-6)
    assert "step_flops" not in compiled  # compiled code hides its ops from the counter
    assert set(r["impls"]) == {"ours eager", "ours default", "diffusers eager", "diffusers compiled"}
    md = out_md.read_text()
    assert "step vs diffusers compiled" in md and "Failed: none" in md


def test_compiled_reference_records_failures_and_drops_fullgraph():
    """A recipe step that raises is recorded and the rest applied; a module that cannot be traced whole is compiled
    again without fullgraph at its first call, and still gives the eager result."""
    recipe = _script("reference_compiled")

    class Breaks(torch.nn.Module):
        def forward(self, x):
            torch._dynamo.graph_break()
            return x * 2

    class Vae(torch.nn.Module):
        def fuse_qkv_projections(self):
            pass

        def decode(self, x):
            return x + 1

    pipe = type("Pipe", (), {})()
    pipe.image_unet, pipe.vae = Breaks(), Vae()  # the UNet has no fuse_qkv_projections
    compiled = recipe.CompiledReference(pipe, backend="eager")
    assert list(compiled.failed) == ["image_unet.fuse_qkv_projections()"]
    assert "vae.fuse_qkv_projections()" in compiled.applied
    x = torch.ones(2)
    assert torch.equal(compiled.first_call(lambda: pipe.image_unet(x)), x * 2)
    assert "fullgraph=True" in compiled.failed and "fullgraph=False" in compiled.applied[-1]
    assert torch.equal(pipe.vae.decode(x), x + 1)


def test_bench_isolated_memory_and_load(ckpt, tmp_path):
    """The fresh-process memory and load runs alone (--skip-timing, as gpu_run.sh's memory stage runs them)."""
    out_json = tmp_path / "bench.json"
    stdout = _run(BENCHMARKS / "bench.py", ckpt, *TINY, "--tasks", "dual_guided", "--ref-variants", "dedicated",
                  "--skip-timing", "--json", out_json)
    result = json.loads(out_json.read_text())
    assert result["tasks"] == {}
    runs = result["memory"]["dual_guided"]
    assert set(runs) == {"ours", "dedicated"}
    for r in runs.values():
        assert r["load_s"] > 0 and r["rss_peak"] >= r["rss_load"] > 0
    assert "dual_guided" in stdout


def test_load_rss(ckpt, tmp_path):
    out_json = tmp_path / "rss.json"
    stdout = _run(BENCHMARKS / "load_rss.py", ckpt, "--tasks", "text_to_image", "--no-reference", "--json", out_json)
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["what"] for r in rows] == ["text_to_image"]
    assert rows[0]["rss_touched"] >= rows[0]["rss_load"] > 0 and rows[0]["params"] > 0
    assert "text_to_image" in stdout


def test_load_breakdown(ckpt, tmp_path):
    """load_breakdown.py: both implementations timed, and our load split into the phases it names."""
    out = tmp_path / "load.json"
    stdout = _run(BENCHMARKS / "load_breakdown.py", ckpt, "--device", "cpu", "--tasks", "text_to_image",
                  "--repeats", "1", "--json", out)
    r = json.loads(out.read_text())["tasks"]["text_to_image"]
    assert r["ours"]["median_s"] > 0 and r["reference"]["median_s"] > 0
    phases = r["phases_ours"]
    for phase in ("build the modules on the meta device", "read the weights (and copy them to the device)",
                  "assign the weights to the modules"):
        assert 0 < phases[phase] < phases["total (under the profiler)"]
    assert "text_to_image" in stdout


def test_step_breakdown(ckpt, tmp_path):
    """step_breakdown.py off CUDA: kernel kinds add up to the total, every variant is listed, the VAE's
    channels-last candidate equals the plain decode, and the whole call is split into parts that add up."""
    out = tmp_path / "breakdown.json"
    _run(BENCHMARKS / "step_breakdown.py", ckpt, "--device", "cpu", "--size", "64", "--steps", "1", "--repeats", "1",
         "--profile-calls", "1", "--json", out)
    r = json.loads(out.read_text())
    kernels = r["kernels"]
    assert kernels["total_ms"] > 0 and kernels["kinds"]["convolution"]["ms"] > 0
    assert sum(v["ms"] for v in kernels["kinds"].values()) == pytest.approx(kernels["total_ms"])
    assert set(r["variants"]) == {"default", "sdpa flash_attention first", "sdpa efficient_attention first",
                                  "sdpa cudnn_attention first", "blas cublaslt", "group_norm channels-last"}
    assert r["variants"]["default"]["step_ms"] > 0  # the others need CUDA (off it, the same step or an error)
    assert r["kernels_channels_last_group_norm"]["total_ms"] > 0
    assert r["vae_decode_ms"]["channels_last_eager"] > 0 and r["vae_decode_ms"]["channels_last_rel_diff"] < 1e-5
    e = r["e2e_ms"]
    assert e["total"] == pytest.approx(e["unet_steps"] + e["vae_decode"] + e["rest"])


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(2, 32, 8, 8), (1, 12, 5, 3), (3, 8, 1, 1), (2, 16, 6, 1)])
def test_channels_last_group_norm_equals_group_norm(shape, affine):
    """The GroupNorm candidate that bench.py and step_breakdown.py time on the GPU equals torch's (float64), and
    keeps the input's layout: no copy back to NCHW before the next channels-last convolution."""
    cl = _script("channels_last_group_norm")
    plain = torch.nn.GroupNorm(4, shape[1], eps=1e-6, affine=affine).double()
    if affine:
        torch.nn.init.normal_(plain.weight, generator=torch.Generator().manual_seed(1))
        torch.nn.init.normal_(plain.bias, generator=torch.Generator().manual_seed(2))
    norm = cl.ChannelsLastGroupNorm(4, shape[1], eps=1e-6, affine=affine).double()
    norm.load_state_dict(plain.state_dict())
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3 + 1
    for layout in (torch.channels_last, torch.contiguous_format):
        out = norm(x.to(memory_format=layout))
        torch.testing.assert_close(out, plain(x), rtol=1e-12, atol=1e-12)
        assert out.is_contiguous(memory_format=layout)


def test_channels_last_group_norm_in_half_precision():
    """In float16 (what the GPU runs) the candidate is about as close to the float64 truth as torch's kernel:
    measured 3.6e-4 against torch's 2.1e-4 (relative), with channel means far from zero."""
    cl = _script("channels_last_group_norm")
    g = torch.Generator().manual_seed(0)
    plain = torch.nn.GroupNorm(32, 320, eps=1e-5)
    torch.nn.init.normal_(plain.weight, generator=g)
    torch.nn.init.normal_(plain.bias, generator=g)
    x = torch.randn(2, 320, 16, 16, generator=g) * 2 + torch.randn(1, 320, 1, 1, generator=g) * 3
    truth = plain.double()(x.double())
    norm = cl.ChannelsLastGroupNorm(32, 320, eps=1e-5).half()
    norm.load_state_dict(plain.state_dict())
    out = norm(x.half().to(memory_format=torch.channels_last)).double()
    assert ((out - truth).norm() / truth.norm()).item() < 1e-3


def test_channels_last_group_norms_swap_every_group_norm_and_keep_the_keys():
    cl = _script("channels_last_group_norm")
    from helpers import TINY_UNET_A, randomize_
    from vd.nn import Context, UNet, UNetConfig
    unet = randomize_(UNet(UNetConfig.from_diffusers(TINY_UNET_A)).eval(), 0)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 16)
    streams = [Context(unet.context_layers(), ctx)]
    with torch.no_grad():
        want = unet(x, 500, streams)
        keys = unet.state_dict().keys()
        unet.to(memory_format=torch.channels_last)
        cl.channels_last_group_norms_(unet)
        norms = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]
        assert norms and all(type(m) is cl.ChannelsLastGroupNorm for m in norms)
        assert unet.state_dict().keys() == keys
        got = unet(x.to(memory_format=torch.channels_last), 500, streams)
    assert ((got - want).norm() / want.norm()).item() < 1e-5  # float32: other kernels, other rounding


def test_samplers(ckpt, tmp_path):
    """samplers.py: every row timed, the sampler's own share of a step measured, DDIM 50 as the baseline."""
    out = tmp_path / "samplers.json"
    _run(BENCHMARKS / "samplers.py", ckpt, "--device", "cpu", "--size", "64", "--repeats", "1", "--json", out)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["sampler"], r["steps"]) for r in rows] == [("ddim", 50), ("dpmpp_2m_karras", 20),
                                                          ("dpmpp_2m_karras", 25), ("unipc", 20), ("unipc", 25)]
    assert all(r["seconds_per_image"] > 0 and r["step_s"] > 0 and 0 < r["sampler_share"] < 1 for r in rows)


def test_compile_probe(tmp_path):
    """compile_probe.py on tiny blocks (inductor writes C++ on a CPU): both blocks compiled, equal to eager, their
    generated code written and summarised (kernels, launches, GroupNorm kernels and how they read, buffers)."""
    out, code, md = tmp_path / "probe.json", tmp_path / "code.py", tmp_path / "probe.md"
    _run(BENCHMARKS / "compile_probe.py", "--device", "cpu", "--channels", "32", "--size", "8", "--tokens", "7",
         "--context-dim", "16", "--heads", "4", "--temb", "64", "--groups", "8", "--repeats", "2", "--code", code,
         "--json", out, "--markdown", md)
    blocks = json.loads(out.read_text())["blocks"]
    assert set(blocks) == {"ResnetBlock", "SpatialTransformer"}
    for r in blocks.values():
        assert r["rel_diff"] < 1e-5  # float32 (measured: at most 1.2e-7)
        assert r["kernels"] and set(r["kernels"]) <= set(r["launches"]) and r["library_calls"]
        assert r["group_norm_kernels"] and all(v["loads"] for v in r["group_norm_kernels"].values())
        assert r["ms"]["eager"] > 0 and r["ms"]["compiled"] > 0 and r["buffers_4d"]
    assert code.read_text().count("def call(") == 2
    assert "ResnetBlock" in md.read_text() and "SpatialTransformer" in md.read_text()


def test_throughput_goes_on_without_an_implementation_that_fails():
    """An implementation that fails at a batch (out of memory, say) is recorded with its error there and left out of
    the larger batches; the others are measured, and the results are saved after every batch."""
    _script("bench")  # puts benchmarks/ on sys.path for throughput.py's import
    throughput = _script("throughput")

    class Fake:
        def __init__(self, name, largest):
            self.name, self.largest, self.resident = name, largest, None

        def run(self, task, num_images_per_prompt, **kw):
            if num_images_per_prompt > self.largest:
                raise MemoryError(f"{num_images_per_prompt} images")
            return [None] * num_images_per_prompt

    impls = [Fake("ours default", 16), Fake("diffusers eager", 4)]
    a = type("Args", (), dict(throughput_batches=[1, 8, 16], throughput_repeats=2, size=64, steps=2, guidance=7.5))
    out, saves = {}, []
    throughput.measure_throughput("text_to_image", impls, a, torch.device("cpu"), out, lambda: saves.append(1))
    assert list(out) == ["1", "8", "16"] and len(saves) == 3
    assert all(x["images_per_s"] > 0 for x in out["1"].values())
    assert out["8"]["diffusers eager"]["error"] == "MemoryError: 8 images"
    assert "images_per_s" in out["8"]["ours default"] and list(out["16"]) == ["ours default"]
    assert [impl.name for impl in impls] == ["ours default"]


def test_work_table_counts_each_side_on_its_own():
    """A row that hides its ops takes the count of an eager implementation of its own side, never the other
    side's: without one (the compiled-reference stage runs no eager ours) it shows none."""
    report = _script("bench_report")
    impl = dict(step_flops=2e12, e2e_flops=1e14, step_s=0.01, e2e_s=0.5)
    result = dict(settings=dict(device="cuda:0"), env=dict(peak_tflops=None), tasks={"text_to_image": {"impls": {
        "diffusers eager": impl, "diffusers compiled": dict(step_s=0.005, e2e_s=0.3),
        "ours default": dict(step_s=0.004, e2e_s=0.25)}}})
    rows = {line.split(" | ")[1]: line for line in report.work_table(result) if line.startswith("| text_to_image")}
    assert rows["diffusers compiled"].split(" | ")[2:4] == ["2", "100"]  # its side's eager count
    assert rows["ours default"].split(" | ")[2:] == ["—", "—", "—", "— |"]
