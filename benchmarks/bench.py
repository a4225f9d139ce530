"""Benchmark vd against diffusers' Versatile Diffusion pipelines: same checkpoint, same device, same run.

    python benchmarks/bench.py CKPT [--device cuda --dtype fp16 --size 512 --steps 50] [--json F] [--markdown F]

CKPT is a diffusers-layout folder (benchmarks/make_checkpoint.py writes one with random weights). For each task
and each implementation (our variants, --ours; diffusers, if installed, with the two smallest patches that make
it run, eager and/or with its documented speed-up recipe, --reference) we measure, in this one process and
interleaved (A, B, ..., then ..., B, A), after warm-up, median of N:
  first  three short calls: the first calls' extra seconds (compile, CUDA-graph capture), the memory they hold;
  step   one UNet call with classifier-free guidance (batch 2), replaying the exact arguments the pipeline
         passed to its UNet (captured with a forward pre-hook, so the reference's swapped or dual transformers
         and our context streams are what runs), under the pipeline's own autocast state;
  e2e    one whole task call per image: encode + N denoising steps + decode, output_type "np";
  decode the VAE decode of one image as the pipeline runs it after sampling;
  FLOPs  counted with torch.utils.flop_counter.FlopCounterMode on a step and on a short run (never typed in);
         achieved TFLOP/s = FLOPs / median time, and its fraction of the card's dense fp16 peak;
  throughput (--throughput-batches) images per second at several batch sizes, with peak memory (throughput.py).
Each implementation is then loaded again in a fresh subprocess per task (`--child`) for the load time (files
to ready on the device), the peak host RSS while loading (VmHWM) and the peak memory of a run
(torch.cuda.max_memory_allocated on CUDA, VmHWM on CPU). `--profile DIR` wraps one run of each in the torch
profiler. Results: markdown tables on stdout (and --markdown) and everything in --json, both rewritten as the
run goes, so a run stopped by a time limit keeps what it measured.
"""

import argparse
import atexit
import dataclasses
import datetime
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere without installing vd
sys.path.insert(0, str(ROOT / "benchmarks"))  # its helper modules, also when loaded from a file path

from bench_report import REF_LOADS as REF_VARIANTS, REF_NAMES, markdown  # noqa: E402
from vd.checks import DTYPES  # noqa: E402

TASKS = ("text_to_image", "image_variation", "dual_guided")
PROMPT = "a red car parked in the sun, photograph"
STRENGTH = 0.5
# Dense fp16/bf16 tensor-core peaks (TFLOP/s) by device-name substring, first match wins (vendor data sheets).
PEAK_TFLOPS = (("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("GH200", 989),
               ("A100", 312), ("L40S", 362), ("L4", 121), ("A10G", 70), ("A10", 125), ("RTX 4090", 165))
# The reference loads for the memory/load table (REF_VARIANTS), and which ones each task is compared with by
# default: the task pipeline as its docs load it (with remove_unused_weights()), and the loads the targets name.
DEFAULT_VARIANTS = {"text_to_image": ("dedicated", "all_in_one"), "image_variation": ("dedicated",),
                    "dual_guided": ("dedicated", "dedicated_full")}


# ---- environment and measuring helpers

def versions() -> dict:
    """The installed versions, read from the package metadata: nothing is imported (diffusers takes seconds)."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "transformers", "accelerate", "safetensors"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def peak_tflops(name: str, dtype: torch.dtype) -> float | None:
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Wall seconds of fn(), with the device drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def vm_hwm() -> int:
    """Peak resident set size of this process in bytes (VmHWM). Unlike ru_maxrss it starts afresh at exec, so a
    child does not inherit the high-water mark of the process that spawned it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def preimport(impl: str) -> float:
    """Import what loading will use, so a load time measures loading only (both sides import transformers'
    CLIP classes; ours imports vd, the reference diffusers and its VD pipelines). Returns the seconds taken."""
    t0 = time.perf_counter()
    import transformers
    for name in ("CLIPTextModelWithProjection", "CLIPVisionModelWithProjection", "CLIPTokenizer", "CLIPImageProcessor"):
        getattr(transformers, name)
    if impl == "ours":
        import vd.pipeline  # noqa: F401
    else:
        import diffusers
        patch_diffusers()
        for name in ("VersatileDiffusionPipeline", "VersatileDiffusionTextToImagePipeline",
                     "VersatileDiffusionImageVariationPipeline", "VersatileDiffusionDualGuidedPipeline"):
            getattr(diffusers, name)
    # The imported modules live for good: frozen, every later collection (free()'s and the automatic ones) skips
    # them. A CPU smoke run of bench.py spent 4.8 s collecting before, 1.6 s after. Unfrozen at exit, where
    # triton's bindings report their objects left uncollected as leaks (a second unfreeze, from a second
    # preimport, does nothing).
    gc.freeze()
    atexit.register(gc.unfreeze)
    return time.perf_counter() - t0


def init_device(device: torch.device) -> None:
    """Create the CUDA context up front, so neither implementation's load time or memory pays for it."""
    if device.type == "cuda":
        torch.empty(1, device=device)
        sync(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


class OpCounter(TorchDispatchMode):
    """Counts the aten ops a call dispatches (on a GPU each is at least one kernel launch), and how many of them
    are dtype casts or copies."""

    def __init__(self):
        super().__init__()
        self.ops = self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.casts += func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.copy_)
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> tuple[int, int]:
    with OpCounter() as counter:
        fn()
    return counter.ops, counter.casts


# ---- inputs

def condition_image(size: int = 512, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.RandomState(seed)
    return PIL.Image.fromarray((rng.rand(size, size, 3) * 255).astype(np.uint8))


def task_kwargs(task: str, size: int, steps: int, guidance: float, seed: int = 0) -> dict:
    """The arguments both implementations get for one call (same names in both)."""
    kw = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
              generator=torch.Generator().manual_seed(seed))
    if task in ("text_to_image", "dual_guided"):
        kw["prompt"] = PROMPT
    if task in ("image_variation", "dual_guided"):
        kw["image"] = condition_image()
    if task == "dual_guided":
        kw["text_to_image_strength"] = STRENGTH
    return kw


# ---- the two implementations, behind one small interface

class Impl:
    """A loaded pipeline: `run(task, **kw)` -> np images [N, H, W, 3]; `unet` is the module called each step and
    `step` what a denoising step calls (ours: the NoisePredictor, which may replay a CUDA graph; default `unet`);
    `decode(latents)` -> images [N, 3, H, W] in [0, 1], the pipeline's decode of scaled latents. `countable`: it
    runs eagerly, so FLOPs and aten ops can be counted (a CUDA graph replay or compiled code hides them);
    `first_call(fn)` runs the first call (the compiled reference may compile again there); `resident` = device
    bytes its load allocated."""

    def __init__(self, name: str, pipe, unet, run, decode, step=None, countable: bool = True, first_call=None,
                 setup=None):
        self.name, self.pipe, self.unet, self._run, self.decode = name, pipe, unet, run, decode
        self.step, self.countable = step or unet, countable
        self.first_call = first_call or (lambda fn: fn())
        self.setup = setup or (lambda: None)  # seconds of compile / CUDA-graph capture so far, if it keeps them
        self.resident, self.recipe = None, None  # recipe: the compiled reference's CompiledReference

    def run(self, task: str, **kw) -> np.ndarray:
        return self._run(task, **kw)


# Our variants: from_pretrained's fast-path arguments (None: its default, on when the device is CUDA). "default"
# is what a user gets.
OURS = {"eager": {"cuda_graphs": False, "triton_kernels": False},
        "graphs": {"cuda_graphs": True, "triton_kernels": False},
        "kernels": {"cuda_graphs": False, "triton_kernels": True},
        "default": {"cuda_graphs": None, "triton_kernels": None},
        # the default with one change undone, to measure it alone: cross-attention keys and values every step
        "default+kv_per_step": {"cuda_graphs": None, "triton_kernels": None},
        "compile": {"compile": True, "cuda_graphs": True},
        # a fast-path candidate of runs 4-6: GroupNorm kept channels-last (channels_last_group_norm.py)
        "graphs+nhwc_norm": {"cuda_graphs": True, "triton_kernels": False}}
REF_EAGER, REF_COMPILED = REF_NAMES


def ours_name(variant: str) -> str:
    return f"ours {variant}"


class KeysValuesPerStep:
    """Our noise predictor given the streams without their precomputed keys and values, so that every step
    projects the tokens again, as vd did before computing them once per call."""

    def __init__(self, eps):
        self.eps = eps

    @property
    def setup_seconds(self) -> float:
        return self.eps.setup_seconds

    def __call__(self, x, t, streams):
        return self.eps(x, t, [dataclasses.replace(c, keys_values=None) for c in streams])


def tune_ours(pipe, variant: str) -> None:
    """The candidate's change to a loaded pipeline (benchmarks/channels_last_group_norm.py, KeysValuesPerStep)."""
    if variant.endswith("+kv_per_step"):
        pipe.image_eps = KeysValuesPerStep(pipe.image_eps)
    if variant.endswith("+nhwc_norm"):
        from channels_last_group_norm import channels_last_group_norms_
        # text_to_image runs the text UNet's context layers
        for unet in (pipe.components.image_unet, pipe.components.text_unet):
            if unet is not None:
                channels_last_group_norms_(unet)


def load_ours(ckpt: Path, task: str, device: torch.device, dtype: torch.dtype, variant: str = "default") -> Impl:
    from vd import VersatileDiffusion
    # the reference's "no image" condition (a CLIP encoding either way), so outputs can be compared
    pipe = VersatileDiffusion.from_pretrained(ckpt, tasks=[task], device=device, dtype=dtype,
                                              uncond_image="diffusers", **OURS[variant])
    tune_ours(pipe, variant)
    countable = variant == "eager" or (device.type != "cuda" and variant != "compile")
    return Impl(ours_name(variant), pipe, pipe.components.image_unet,
                lambda t, **kw: getattr(pipe, t)(**kw, progress=False).images, pipe._decode, step=pipe.image_eps,
                countable=countable, setup=lambda: pipe.image_eps.setup_seconds)


def patch_diffusers() -> None:
    """The two smallest patches that let diffusers 0.42.1 load and run the VD checkpoint:
    1. its pipeline loader no longer resolves the library name "versatile_diffusion" that the hub's
       model_index.json gives for text_unet: alias that name to the module that holds the class;
    2. DualTransformer2DModel.forward does not accept the `encoder_attention_mask` its callers pass: accept
       and drop it (as tests/pipeline/test_pipeline_parity.py does)."""
    from diffusers.models import DualTransformer2DModel
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging
    for log in (dlogging, tlogging):  # no progress bars or advice in the benchmark's output
        log.disable_progress_bar()
        log.set_verbosity_error()
    sys.modules.setdefault("versatile_diffusion", importlib.import_module(
        "diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet"))
    if getattr(DualTransformer2DModel.forward, "_bench_patched", False):
        return
    original = DualTransformer2DModel.forward

    def forward(self, hidden_states, encoder_hidden_states, encoder_attention_mask=None, **kw):
        return original(self, hidden_states, encoder_hidden_states, **kw)
    forward._bench_patched = True
    DualTransformer2DModel.forward = forward


def reference_available() -> bool:
    return importlib.util.find_spec("diffusers") is not None


def load_reference(ckpt: Path, task: str, device: torch.device, dtype: torch.dtype,
                   variant: str = "dedicated", compiled: dict | None = None) -> Impl:
    """diffusers' pipeline loaded the way its docs show: from_pretrained(dtype=...) (the docs' `torch_dtype`,
    renamed in 0.42), for the dedicated pipelines remove_unused_weights(), then .to(device). `compiled`: the
    arguments of reference_compiled.CompiledReference (its documented speed-up recipe) to apply."""
    import diffusers
    patch_diffusers()
    if variant == "all_in_one":
        pipe = diffusers.VersatileDiffusionPipeline.from_pretrained(ckpt, dtype=dtype)
    else:
        cls = {"text_to_image": diffusers.VersatileDiffusionTextToImagePipeline,
               "image_variation": diffusers.VersatileDiffusionImageVariationPipeline,
               "dual_guided": diffusers.VersatileDiffusionDualGuidedPipeline}[task]
        pipe = cls.from_pretrained(ckpt, dtype=dtype)
        if variant == "dedicated" and hasattr(pipe, "remove_unused_weights"):
            pipe.remove_unused_weights()
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    recipe = None
    if compiled is not None:
        from reference_compiled import CompiledReference
        recipe = CompiledReference(pipe, **compiled)

    def run(t: str, **kw) -> np.ndarray:
        call = getattr(pipe, t) if variant == "all_in_one" else pipe
        return call(**kw).images

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:  # what its pipelines do after sampling, to [0, 1]
        images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return (images / 2 + 0.5).clamp(0, 1)
    # the step calls whatever module the pipeline calls now (the compiled reference may compile again)
    impl = Impl(REF_COMPILED if recipe else REF_EAGER, pipe, pipe.image_unet, run, decode,
                step=lambda *args, **kw: pipe.image_unet(*args, **kw), countable=recipe is None,
                first_call=recipe and recipe.first_call)
    impl.recipe = recipe
    return impl


def load(impl: str, ckpt: Path, task: str, device: torch.device, dtype: torch.dtype, variant: str) -> Impl:
    """A load for the fresh-process memory runs: `variant` is ours' (OURS) or the reference's load
    (REF_VARIANTS)."""
    if impl == "ours":
        return load_ours(ckpt, task, device, dtype, variant)
    return load_reference(ckpt, task, device, dtype, variant)


# ---- one UNet step, exactly as the pipeline made it

class StepRecorder:
    """Records the first call of the implementation's UNet (arguments and autocast state) so that the step can be
    replayed on its own, through what the pipeline calls (`impl.step`)."""

    def __init__(self, impl: Impl):
        self.unet, self.call = impl.step, None
        self.handle = impl.unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if self.call is None:
            kind = args[0].device.type
            self.call = (args, kwargs, kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))

    def remove(self) -> None:
        self.handle.remove()

    def replay(self):
        args, kwargs, kind, autocast, dtype = self.call
        with torch.no_grad(), torch.autocast(kind, dtype=dtype, enabled=autocast):
            return self.unet(*args, **kwargs)


# ---- the in-process measurements for one task

def held(device: torch.device) -> tuple[int, int] | None:
    """Device bytes allocated and reserved once unused cached blocks are released (CUDA only)."""
    if device.type != "cuda":
        return None
    free(device)
    return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)


def first_calls(task: str, impl: Impl, a, device: torch.device) -> tuple[dict, StepRecorder]:
    """Three short runs: what the first calls cost beyond a warm one (compile, CUDA-graph capture, autotuning) and
    the device memory they leave held (a CUDA graph's private pool); the first UNet call recorded for replay.
    Then, if the implementation runs eagerly, FLOPs and aten ops counted (the per-image FLOPs add the steps the
    short run left out)."""
    steps = min(2, a.steps)

    def short():
        return impl.run(task, **task_kwargs(task, a.size, steps, a.guidance))
    rec = StepRecorder(impl)
    before = held(device)
    times = [timed(lambda: impl.first_call(short), device)]
    rec.remove()
    if rec.call is None:
        raise RuntimeError(f"{impl.name}: the pipeline never called its image UNet")
    times += [timed(short, device) for _ in range(2)]
    r = {"first_calls_s": times, "first_calls_extra_s": times[0] + times[1] - 2 * times[2]}
    after = held(device)
    if after:
        r["held_allocated"], r["held_reserved"] = after[0] - before[0], after[1] - before[1]
    setup = impl.setup()
    if setup is not None:
        r["setup_s"] = setup
    if impl.countable:
        step_flops = count_flops(rec.replay)
        ops, casts = count_ops(rec.replay)
        r.update(step_flops=step_flops, e2e_flops=count_flops(short) + (a.steps - steps) * step_flops,
                 step_aten_ops=ops, step_casts=casts)
    return r, rec


def interleaved(impls: list[Impl], call, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of call(impl) per implementation, alternating the order every round (AB, BA, AB, ...)."""
    times = {impl.name: [] for impl in impls}
    for r in range(repeats):
        for impl in (impls if r % 2 == 0 else impls[::-1]):
            times[impl.name].append(timed(lambda: call(impl), device))
    return times


def keep(res: dict, key: str, times: dict[str, list[float]]) -> None:
    for name, t in times.items():
        res[name][key], res[name][f"{key}_min"], res[name][f"{key}_all"] = statistics.median(t), min(t), t


def diff(images: dict, res: dict, prefix: str = "") -> None:
    """Largest and mean absolute difference of each implementation's images to the eager reference's."""
    if REF_EAGER in images:
        ref = np.asarray(images[REF_EAGER], dtype=np.float64)
        for name, x in images.items():
            if name != REF_EAGER:
                d = np.abs(np.asarray(x, dtype=np.float64) - ref)
                res[name][f"{prefix}max_abs_diff"] = float(d.max())
                res[name][f"{prefix}mean_abs_diff"] = float(d.mean())


def measure_task(task: str, impls: list[Impl], a, device: torch.device) -> dict:
    """First calls (setup, held memory, counted work), then interleaved step, end-to-end and decode timings
    (each skipped at 0 repeats); returns per-implementation results. An implementation whose first calls fail
    is recorded with its error and removed from `impls`."""
    res, recorders, outputs = {}, {}, {}
    for impl in list(impls):
        try:
            res[impl.name], recorders[impl.name] = first_calls(task, impl, a, device)
        except Exception as e:  # e.g. the compiled reference failing to compile: the others are still measured
            traceback.print_exc()
            res[impl.name] = {"error": f"{type(e).__name__}: {e}"}
            impls.remove(impl)
            free(device)
    if a.step_repeats:
        for impl in impls:
            for _ in range(a.step_warmup):
                timed(recorders[impl.name].replay, device)
        keep(res, "step_s", interleaved(impls, lambda impl: recorders[impl.name].replay(), a.step_repeats, device))
    if a.e2e_repeats:
        for impl in impls:
            for _ in range(a.warmup):
                impl.run(task, **task_kwargs(task, a.size, a.steps, a.guidance))

        def e2e(impl: Impl) -> None:
            outputs[impl.name] = impl.run(task, **task_kwargs(task, a.size, a.steps, a.guidance))
        keep(res, "e2e_s", interleaved(impls, e2e, a.e2e_repeats, device))
        for name, x in outputs.items():
            res[name]["finite"] = bool(np.isfinite(x).all())
        diff(outputs, res)
    if a.decode_repeats:
        from decode import measure_decode
        measure_decode(impls, a, device, res)
    if a.profile:
        for impl in impls:
            try:  # a profiler problem must not cost the measurements of a one-shot device run
                profile_run(task, impl, a, device)
            except Exception:
                traceback.print_exc()
    return res


def profile_run(task: str, impl: Impl, a, device: torch.device) -> None:
    """One call (--profile-steps steps) under the torch profiler: a gzipped chrome trace and a table of the top
    ops by self time (device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    folder = Path(a.profile)
    folder.mkdir(parents=True, exist_ok=True)
    with profile(activities=activities) as prof:
        impl.run(task, **task_kwargs(task, a.size, a.profile_steps or a.steps, a.guidance))
        sync(device)
    stem = f"{task}-{impl.name.replace(' ', '_')}"
    prof.export_chrome_trace(str(folder / f"{stem}.json.gz"))
    key = "self_cpu_time_total"
    if device.type == "cuda":  # renamed in torch 2.4; the old name is deprecated
        key = "self_device_time_total" if "self_device_time_total" in table_keys(prof) else "self_cuda_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30)
    (folder / f"{stem}.txt").write_text(table)
    print(f"profile {task} {impl.name}:\n{table}", flush=True)


def table_keys(prof) -> set[str]:
    return set(dir(prof.key_averages()[0])) if len(prof.key_averages()) else set()


# ---- the isolated measurements: one fresh process per (implementation, task)

def child_main(a) -> None:
    """Runs in a fresh process: load one implementation for one task, run it once, print one JSON line."""
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    impl_name, _, variant = a.child.partition(":")
    task = a.tasks[0]
    out = {"import_s": preimport(impl_name)}
    init_device(device)
    out["rss_before_load"] = vm_hwm()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    impl = load(impl_name, Path(a.ckpt), task, device, dtype, variant)
    sync(device)
    out["load_s"] = time.perf_counter() - t0
    out["rss_load"] = vm_hwm()
    impl.run(task, **task_kwargs(task, a.size, a.mem_steps, a.guidance))
    sync(device)
    out["rss_peak"] = vm_hwm()
    if device.type == "cuda":
        out["gpu_peak"] = torch.cuda.max_memory_allocated(device)
    print("CHILD " + json.dumps(out), flush=True)


def isolated(impl: str, variant: str, task: str, a) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), str(a.ckpt), "--child", f"{impl}:{variant}",
           "--tasks", task, "--device", a.device, "--dtype", a.dtype, "--size", str(a.size),
           "--mem-steps", str(a.mem_steps), "--guidance", str(a.guidance)]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.child_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {a.child_timeout} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("CHILD ")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
        print(f"child {impl}:{variant} {task} failed:\n" + "\n".join(tail), file=sys.stderr, flush=True)
        return {"error": tail[-1] if tail else f"exit {p.returncode}"}
    return json.loads(lines[-1][len("CHILD "):])


def memory_runs(task: str, a, with_reference: bool) -> dict:
    runs = {"ours": isolated("ours", "default", task, a)}
    if with_reference:
        for variant in DEFAULT_VARIANTS[task] if a.ref_variants is None else a.ref_variants:
            if variant == "dedicated_full" and task == "image_variation":
                continue  # its pipeline has no unused weights to remove: same as "dedicated"
            runs[variant] = isolated("reference", variant, task, a)
    return runs


# ---- main

def loaded(load_fn, device: torch.device) -> Impl:
    """load_fn()'s implementation, with its load time and the device bytes it left allocated (its weights)."""
    before = held(device)
    t = time.perf_counter()
    impl = load_fn()
    sync(device)
    impl.load_s = time.perf_counter() - t
    after = held(device)
    impl.resident = after[0] - before[0] if after else None
    return impl


def time_task(task: str, a, device: torch.device, dtype: torch.dtype, with_ref: bool, out: dict, save) -> None:
    """Load the implementations for one task in this process and measure them into `out`, calling save() as it
    fills; an error is recorded, not raised, so a one-shot device run keeps the numbers it has."""
    impls = []
    try:
        for variant in a.reference if with_ref else []:  # the reference first: it reads every component before
            compiled = None                              # dropping the unused ones
            if variant == "compiled":
                compiled = {"mode": a.ref_compile_mode, "backend": a.ref_compile_backend}
            try:
                impls.append(loaded(lambda: load_reference(a.ckpt, task, device, dtype, compiled=compiled), device))
            except Exception as e:  # the compiled variant's recipe, say: the others are still measured
                traceback.print_exc()
                out.setdefault("load_errors", {})[f"diffusers {variant}"] = f"{type(e).__name__}: {e}"
                continue
            if impls[-1].recipe:
                out["reference_compiled"] = impls[-1].recipe.summary()
        for variant in a.ours[::-1]:
            impls.insert(0, loaded(lambda: load_ours(a.ckpt, task, device, dtype, variant), device))
        out["loads"] = {impl.name: {"load_s_in_process": impl.load_s, "resident": impl.resident} for impl in impls}
        if a.step_repeats or a.e2e_repeats or a.decode_repeats:
            out["impls"] = measure_task(task, impls, a, device)
            save()
        if a.throughput_batches:
            from throughput import measure_throughput
            # batch 1 ran in the first calls above: its CUDA graphs and compiled code already exist
            measure_throughput(task, impls, a, device, out.setdefault("throughput", {}), save,
                               seen={1} if "impls" in out else set())
    except Exception as e:
        traceback.print_exc()
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        impls.clear()
        free(device)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", type=Path, help="diffusers-layout VD folder (benchmarks/make_checkpoint.py)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    ap.add_argument("--size", type=int, default=512, help="image height and width in pixels")
    ap.add_argument("--steps", type=int, default=50, help="denoising steps per image")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--step-repeats", type=int, default=20, help="timed UNet steps (0: none)")
    ap.add_argument("--e2e-repeats", type=int, default=3, help="timed whole calls (0: none)")
    ap.add_argument("--decode-repeats", type=int, default=10, help="timed VAE decodes of one image (0: none)")
    ap.add_argument("--step-warmup", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed full runs per implementation (after the "
                    "three short first calls, which warm up too)")
    ap.add_argument("--throughput-batches", type=int, nargs="*", default=[], metavar="B",
                    help="images per call for the throughput table (num_images_per_prompt), e.g. 1 4 8 16")
    ap.add_argument("--throughput-repeats", type=int, default=2, help="timed calls per batch and implementation")
    ap.add_argument("--mem-steps", type=int, default=2, help="steps of the run in the memory subprocesses "
                    "(peak memory does not grow with steps)")
    ap.add_argument("--ref-variants", nargs="*", choices=list(REF_VARIANTS),
                    help="reference loads to compare memory/load with (default: per task, DEFAULT_VARIANTS)")
    ap.add_argument("--no-reference", action="store_true", help="measure ours only")
    ap.add_argument("--reference", nargs="+", choices=("eager", "compiled"), default=["eager"],
                    help="the reference's variants to time: eager (as its docs load it), compiled (its documented "
                    "speed-up recipe, benchmarks/reference_compiled.py)")
    ap.add_argument("--ref-compile-mode", default="max-autotune",
                    choices=("max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead", "default"),
                    help="torch.compile mode of the compiled reference (max-autotune, as diffusers' docs)")
    ap.add_argument("--ref-compile-backend", default="inductor",
                    help="torch.compile backend of the compiled reference; 'eager' only traces (CPU smoke runs)")
    ap.add_argument("--ours", nargs="+", choices=list(OURS), default=["default"],
                    help="our variants to time: eager (no CUDA graphs, no Triton kernels), graphs (CUDA graphs "
                    "only), kernels (Triton kernels only), default (what from_pretrained gives a user), "
                    "default+kv_per_step (the default with the keys and values projected every step), compile "
                    "(compile=True, cuda_graphs=True), graphs+nhwc_norm (graphs with the GroupNorms of "
                    "channels_last_group_norm.py)")
    ap.add_argument("--cudnn-benchmark-limit", type=int, metavar="N",
                    help="cuDNN algorithms to try per convolution when autotuning, for the whole process "
                    "(torch's default 10; 0: all)")
    ap.add_argument("--no-isolate", action="store_true", help="skip the fresh-process memory/load runs")
    ap.add_argument("--skip-timing", action="store_true", help="only the fresh-process memory/load runs")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--child-timeout", type=int, default=900)
    ap.add_argument("--profile", metavar="DIR", help="also run each implementation once under the profiler")
    ap.add_argument("--profile-steps", type=int, help="steps of the profiled run (default --steps)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.dtype = a.dtype or ("fp16" if a.device.startswith("cuda") else "fp32")
    for name in ("step_repeats", "e2e_repeats", "decode_repeats", "throughput_repeats"):
        if getattr(a, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(a, name)}")
    if any(b < 1 for b in a.throughput_batches):
        ap.error(f"--throughput-batches must be >= 1, got {a.throughput_batches}")
    return a


def save(result: dict, a) -> None:
    """The markdown and JSON so far: a run cut short by a time limit keeps what it measured."""
    result["env"]["load_average_at_end"] = os.getloadavg()
    if a.markdown:
        a.markdown.write_text(markdown(result))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


def main(argv=None) -> dict | None:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.child:
        child_main(a)
        return None
    if a.cudnn_benchmark_limit is not None:  # before any convolution is tuned: the choices are cached per process
        torch.backends.cudnn.benchmark_limit = a.cudnn_benchmark_limit
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    init_device(device)
    with_ref = not a.no_reference and reference_available()
    if not a.skip_timing:  # (the memory runs import in their own processes)
        preimport("ours")
        if with_ref:
            preimport("reference")
    name = device_name(device)
    result = {
        "env": {"device": name, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "versions": versions(), "peak_tflops": peak_tflops(name, dtype), "host": platform.node(),
                "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "load_average_at_start": os.getloadavg()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "child"},
        "reference": with_ref and "diffusers, patched: " + " ".join(patch_diffusers.__doc__.split()),
        "tasks": {}, "memory": {},
    }
    for task in a.tasks:
        print(f"== {task}", flush=True)
        if not a.skip_timing:
            out = result["tasks"][task] = {}
            time_task(task, a, device, dtype, with_ref, out, lambda: save(result, a))
        if not a.no_isolate:
            result["memory"][task] = memory_runs(task, a, with_ref)
        print(json.dumps({task: result["tasks"].get(task), "memory": result["memory"].get(task)}), flush=True)
        save(result, a)
    save(result, a)
    print(markdown(result), flush=True)
    return result


if __name__ == "__main__":
    main()
