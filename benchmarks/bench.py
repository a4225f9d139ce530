"""Benchmark vd against diffusers' Versatile Diffusion pipelines: same checkpoint, same device, same run.

    python benchmarks/bench.py CKPT [--device cuda --dtype fp16 --size 512 --steps 50] [--json F] [--markdown F]

CKPT is a diffusers-layout folder (benchmarks/make_checkpoint.py writes one with random weights). For each task
and each implementation (ours; diffusers, if installed, with the two smallest patches that make it run) we
measure, in this one process and interleaved (ours/reference, then reference/ours), after warm-up, median of N:
  step   one UNet call with classifier-free guidance (batch 2), replaying the exact arguments the pipeline
         passed to its UNet (captured with a forward pre-hook, so the reference's swapped or dual transformers
         and our context streams are what runs), under the pipeline's own autocast state;
  e2e    one whole task call per image: encode + N denoising steps + decode, output_type "np";
  FLOPs  counted with torch.utils.flop_counter.FlopCounterMode on a step and on a short run (never typed in);
         achieved TFLOP/s = FLOPs / median time, and its fraction of the card's dense fp16 peak.
Each implementation is then loaded again in a fresh subprocess per task (`--child`) for the load time (files
to ready on the device), the peak host RSS while loading (VmHWM) and the peak memory of a run
(torch.cuda.max_memory_allocated on CUDA, VmHWM on CPU). `--profile DIR` wraps one run of each in the torch
profiler. Results: a markdown table on stdout (and --markdown) and everything in --json.
"""

import argparse
import datetime
import gc
import importlib
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

from vd.checks import DTYPES  # noqa: E402

TASKS = ("text_to_image", "image_variation", "dual_guided")
PROMPT = "a red car parked in the sun, photograph"
STRENGTH = 0.5
# Dense fp16/bf16 tensor-core peaks (TFLOP/s) by device-name substring, first match wins (vendor data sheets).
PEAK_TFLOPS = (("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("GH200", 989),
               ("A100", 312), ("L40S", 362), ("L4", 121), ("A10G", 70), ("A10", 125), ("RTX 4090", 165))
# The reference variants for the memory/load table, and which ones each task is compared with by default: the
# task pipeline as its docs load it (with remove_unused_weights()), and the loads the issue's targets name.
REF_VARIANTS = {
    "dedicated": "task pipeline, remove_unused_weights()",
    "dedicated_full": "task pipeline as loaded",
    "all_in_one": "VersatileDiffusionPipeline",
}
DEFAULT_VARIANTS = {"text_to_image": ("dedicated", "all_in_one"), "image_variation": ("dedicated",),
                    "dual_guided": ("dedicated", "dedicated_full")}
GIB = 2**30


# ---- environment and measuring helpers

def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "transformers", "accelerate", "safetensors"):
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
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
    `step` what a denoising step calls (ours: the NoisePredictor, which may replay a CUDA graph; default `unet`)."""

    def __init__(self, name: str, pipe, unet, run, step=None):
        self.name, self.pipe, self.unet, self._run = name, pipe, unet, run
        self.step = step or unet

    def run(self, task: str, **kw) -> np.ndarray:
        return self._run(task, **kw)


OURS = {"eager": {}, "graphs": {"cuda_graphs": True}, "compile": {"compile": True, "cuda_graphs": True},
        # a fast-path candidate, measured before it could become a default: GroupNorm kept channels-last
        "graphs+nhwc_norm": {"cuda_graphs": True}}


def ours_name(variant: str) -> str:
    return {"eager": "ours", "compile": "ours+compile+graphs"}.get(variant, f"ours+{variant}")


def tune_ours(pipe, variant: str) -> None:
    """The candidate's change to a loaded pipeline (benchmarks/channels_last_group_norm.py)."""
    if variant.endswith("+nhwc_norm"):
        from channels_last_group_norm import channels_last_group_norms_
        # text_to_image runs the text UNet's context layers
        for unet in (pipe.components.image_unet, pipe.components.text_unet):
            if unet is not None:
                channels_last_group_norms_(unet)


def load_ours(ckpt: Path, task: str, device: torch.device, dtype: torch.dtype, variant: str = "eager") -> Impl:
    from vd import VersatileDiffusion
    # the reference's "no image" condition (a CLIP encoding either way), so outputs can be compared
    pipe = VersatileDiffusion.from_pretrained(ckpt, tasks=[task], device=device, dtype=dtype,
                                              uncond_image="diffusers", **OURS[variant])
    tune_ours(pipe, variant)
    return Impl(ours_name(variant), pipe, pipe.components.image_unet,
                lambda t, **kw: getattr(pipe, t)(**kw, progress=False).images, step=pipe.image_eps)


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
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


def load_reference(ckpt: Path, task: str, device: torch.device, dtype: torch.dtype,
                   variant: str = "dedicated") -> Impl:
    """diffusers' pipeline loaded the way its docs show: from_pretrained(dtype=...) (the docs' `torch_dtype`,
    renamed in 0.42), for the dedicated pipelines remove_unused_weights(), then .to(device)."""
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

    def run(t: str, **kw) -> np.ndarray:
        call = getattr(pipe, t) if variant == "all_in_one" else pipe
        return call(**kw).images
    return Impl("reference", pipe, pipe.image_unet, run)


def load(impl: str, ckpt: Path, task: str, device: torch.device, dtype: torch.dtype,
         variant: str = "dedicated") -> Impl:
    if impl == "ours":
        return load_ours(ckpt, task, device, dtype)
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

def count_work(task: str, impl: Impl, a) -> tuple[StepRecorder, dict]:
    """A counted short run (also the first warm-up), recording the first UNet call; then that step counted:
    FLOPs, aten ops and casts. The per-image FLOPs add the steps the short run left out."""
    rec = StepRecorder(impl)
    steps = min(2, a.steps)
    flops_short = count_flops(lambda: impl.run(task, **task_kwargs(task, a.size, steps, a.guidance)))
    rec.remove()
    if rec.call is None:
        raise RuntimeError(f"{impl.name}: the pipeline never called its image UNet")
    step_flops = count_flops(rec.replay)
    ops, casts = count_ops(rec.replay)
    return rec, dict(step_flops=step_flops, e2e_flops=flops_short + (a.steps - steps) * step_flops,
                     step_aten_ops=ops, step_casts=casts)


def interleaved(impls: list[Impl], call, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of call(impl) per implementation, alternating the order every round (AB, BA, AB, ...)."""
    times = {impl.name: [] for impl in impls}
    for r in range(repeats):
        for impl in (impls if r % 2 == 0 else impls[::-1]):
            times[impl.name].append(timed(lambda: call(impl), device))
    return times


def measure_task(task: str, impls: list[Impl], a, device: torch.device) -> dict:
    """Counted work, warm-up, then interleaved step and e2e timings; returns per-implementation results."""
    res, recorders, outputs = {}, {}, {}
    for impl in impls:
        recorders[impl.name], res[impl.name] = count_work(task, impl, a)
    for impl in impls:
        for _ in range(a.step_warmup):
            timed(recorders[impl.name].replay, device)
        for _ in range(a.warmup):
            impl.run(task, **task_kwargs(task, a.size, a.steps, a.guidance))

    def e2e(impl: Impl) -> None:
        outputs[impl.name] = impl.run(task, **task_kwargs(task, a.size, a.steps, a.guidance))
    step_times = interleaved(impls, lambda impl: recorders[impl.name].replay(), a.step_repeats, device)
    e2e_times = interleaved(impls, e2e, a.e2e_repeats, device)
    for impl in impls:
        r = res[impl.name]
        for key, times in (("step_s", step_times[impl.name]), ("e2e_s", e2e_times[impl.name])):
            r[key], r[f"{key}_min"], r[f"{key}_all"] = statistics.median(times), min(times), times
        r["finite"] = bool(np.isfinite(outputs[impl.name]).all())
    if "reference" in outputs:
        for name in outputs:
            if name != "reference":
                diff = np.abs(outputs[name].astype(np.float64) - outputs["reference"])
                res[name]["max_abs_diff"], res[name]["mean_abs_diff"] = float(diff.max()), float(diff.mean())
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
    prof.export_chrome_trace(str(folder / f"{task}-{impl.name}.json.gz"))
    key = "self_cpu_time_total"
    if device.type == "cuda":  # renamed in torch 2.4; the old name is deprecated
        key = "self_device_time_total" if "self_device_time_total" in table_keys(prof) else "self_cuda_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30)
    (folder / f"{task}-{impl.name}.txt").write_text(table)
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
    impl = load(impl_name, Path(a.ckpt), task, device, dtype, variant or "dedicated")
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
    runs = {"ours": isolated("ours", "", task, a)}
    if with_reference:
        for variant in DEFAULT_VARIANTS[task] if a.ref_variants is None else a.ref_variants:
            if variant == "dedicated_full" and task == "image_variation":
                continue  # its pipeline has no unused weights to remove: same as "dedicated"
            runs[variant] = isolated("reference", variant, task, a)
    return runs


# ---- reporting

def ratio(ours, ref) -> float | None:
    return ours / ref if isinstance(ours, (int, float)) and isinstance(ref, (int, float)) and ref else None


def fmt(x, spec: str = ".3g") -> str:
    return "—" if x is None else format(x, spec)


def header(result: dict) -> list[str]:
    s, env, v = result["settings"], result["env"], result["env"]["versions"]
    peak = f" (dense fp16 peak {env['peak_tflops']} TFLOP/s)" if env["peak_tflops"] else ""
    steps = f"{s['steps']} DDIM steps, " if result["tasks"] else ""
    return [f"### {env['device']}{peak}: {s['dtype']}, {s['size']}x{s['size']}, {steps}CFG {s['guidance']}, "
            "batch 1", "",
            f"{env['date']}; torch {v['torch']}, diffusers {v['diffusers']}, transformers {v['transformers']}, "
            f"accelerate {v['accelerate']}; load average {env['load_average_at_start'][0]:.1f} at start, "
            f"{env['load_average_at_end'][0]:.1f} at end."
            + (f" cuDNN autotuning tries {s['cudnn_benchmark_limit'] or 'all'} algorithms per convolution."
               if s.get("cudnn_benchmark_limit") is not None else ""), ""]


def achieved(x: dict, gpu: bool, peak: float | None) -> str:
    """Achieved FLOP rate of the UNet step and of the whole call: TFLOP/s (and the fraction of the card's peak)
    on a GPU, GFLOP/s on a CPU."""
    if "e2e_s" not in x:
        return "—"
    rates = [x["step_flops"] / x["step_s"], x["e2e_flops"] / x["e2e_s"]]
    if not gpu:
        return " / ".join(f"{r / 1e9:.3g}" for r in rates)
    return " / ".join(f"{r / 1e12:.3g}" + (f" ({r / 1e12 / peak:.0%})" if peak else "") for r in rates)


def speed_table(result: dict) -> list[str]:
    s = result["settings"]
    lines = [f"In one process, interleaved, warm-up excluded; UNet step (CFG, batch 2): median of {s['step_repeats']};"
             f" end to end (encode + {s['steps']} steps + decode): median of {s['e2e_repeats']}.", "",
             "| task | UNet step ours (ms) | ref (ms) | ours/ref | end to end ours (s) | ref (s) | ours/ref "
             "| image diff max (mean) |", "|---|---|---|---|---|---|---|---|"]
    for task, r in result["tasks"].items():
        if "error" in r:
            lines.append(f"| {task} | error: {r['error']} |")
            continue
        ref = r.get("reference", {})
        ref_step = ref["step_s"] * 1e3 if "step_s" in ref else None
        for name in [n for n in r if n.startswith("ours")]:
            o = r[name]
            label = task if name == "ours" else f"{task}, {name}"
            lines.append(f"| {label} | {o['step_s'] * 1e3:.1f} | {fmt(ref_step, '.1f')} "
                         f"| {fmt(ratio(o['step_s'], ref.get('step_s')), '.2f')} | {o['e2e_s']:.3g} "
                         f"| {fmt(ref.get('e2e_s'))} | {fmt(ratio(o['e2e_s'], ref.get('e2e_s')), '.2f')} "
                         f"| {fmt(o.get('max_abs_diff'), '.2g')} ({fmt(o.get('mean_abs_diff'), '.2g')}) |")
    setups = [f"{task}, {n}: {r[n]['setup_s']:.1f} s" for task, r in result["tasks"].items() if "error" not in r
              for n in r if n.startswith("ours") and r[n].get("setup_s")]
    if setups:
        lines += ["", "Compile and CUDA-graph capture, once per shape, not in the timings above: " + "; ".join(setups)]
    return lines


def work_table(result: dict) -> list[str]:
    s, peak = result["settings"], result["env"]["peak_tflops"]
    gpu = s["device"].startswith("cuda")
    unit = "TFLOP/s" if gpu else "GFLOP/s"
    lines = ["", "FLOPs counted (FlopCounterMode); achieved = FLOPs / median time; aten ops = ops one UNet step "
             "dispatches (each at least one kernel launch on a GPU), of which dtype casts/copies.", "",
             f"| task | TFLOP per step | TFLOP per image | ours {unit} step / e2e | reference {unit} step / e2e "
             "| aten ops per step ours (casts) | reference (casts) |", "|---|---|---|---|---|---|---|"]
    for task, r in result["tasks"].items():
        if "error" in r:
            continue
        o, ref = r["ours"], r.get("reference", {})

        def ops(x):
            return f"{x['step_aten_ops']} ({x['step_casts']})" if "step_aten_ops" in x else "—"
        lines.append(f"| {task} | {o['step_flops'] / 1e12:.4g} | {o['e2e_flops'] / 1e12:.4g} "
                     f"| {achieved(o, gpu, peak)} | {achieved(ref, gpu, peak)} | {ops(o)} | {ops(ref)} |")
    return lines


def memory_table(result: dict) -> list[str]:
    s, gpu = result["settings"], result["settings"]["device"].startswith("cuda")
    what, key = ("peak GPU memory", "gpu_peak") if gpu else ("peak RSS of a run", "rss_peak")
    lines = ["", f"Each in a fresh process: {what} over load + one {s['mem_steps']}-step run; load time = files to "
             "ready on the device; peak RSS while loading = VmHWM after loading.", "",
             f"| task | reference | {what} ours (GiB) | reference (GiB) | ours/ref | load ours (s) | reference (s) "
             "| ours/ref | peak RSS while loading ours (GiB) | reference (GiB) | ours/ref |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, runs in result["memory"].items():
        o = runs["ours"]
        for variant, ref in runs.items():
            if variant == "ours":
                continue
            cells = []
            for k, scale in ((key, GIB), ("load_s", 1), ("rss_load", GIB)):
                ov, rv = o.get(k), ref.get(k)
                cells += [fmt(ov and ov / scale), fmt(rv and rv / scale), fmt(ratio(ov, rv), ".2f")]
            errors = "; ".join(f"{n} error: {x['error']}" for n, x in (("ours", o), ("reference", ref)) if "error" in x)
            lines.append(f"| {task} | {REF_VARIANTS[variant]}{' (' + errors + ')' if errors else ''} | "
                         + " | ".join(cells) + " |")
    return lines


def markdown(result: dict) -> str:
    lines = header(result)
    lines += speed_table(result) + work_table(result) if result["tasks"] else []
    lines += memory_table(result) if result["memory"] else []
    return "\n".join(lines) + "\n"


# ---- main

def time_task(task: str, a, device: torch.device, dtype: torch.dtype, with_ref: bool) -> dict:
    """Load the implementations for one task in this process and measure them; an error is recorded, not raised,
    so a one-shot device run keeps the other tasks' numbers."""
    impls = []
    try:
        if with_ref:  # the reference first: it reads every component before dropping the unused ones
            t = time.perf_counter()
            impls.append(load("reference", a.ckpt, task, device, dtype))
            free(device)
            ref_load = time.perf_counter() - t
        for variant in a.ours[::-1]:
            t = time.perf_counter()
            impls.insert(0, load_ours(a.ckpt, task, device, dtype, variant))
            loaded = time.perf_counter() - t
        res = measure_task(task, impls, a, device)
        res["ours"]["load_s_in_process"] = loaded
        for impl in impls:
            if impl.name.startswith("ours"):  # compile and CUDA-graph capture, kept apart from the timings
                res[impl.name]["setup_s"] = impl.pipe.image_eps.setup_seconds
        if with_ref:
            res["reference"]["load_s_in_process"] = ref_load
        return res
    except Exception as e:
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"}
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
    ap.add_argument("--step-repeats", type=int, default=20)
    ap.add_argument("--e2e-repeats", type=int, default=3)
    ap.add_argument("--step-warmup", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed full runs per implementation (after the "
                    "counted 2-step run, which is a warm-up too)")
    ap.add_argument("--mem-steps", type=int, default=2, help="steps of the run in the memory subprocesses "
                    "(peak memory does not grow with steps)")
    ap.add_argument("--ref-variants", nargs="*", choices=list(REF_VARIANTS),
                    help="reference loads to compare memory/load with (default: per task, DEFAULT_VARIANTS)")
    ap.add_argument("--no-reference", action="store_true", help="measure ours only")
    ap.add_argument("--ours", nargs="+", choices=list(OURS), default=["eager"],
                    help="our variants to time: eager (default path), graphs (cuda_graphs=True), compile "
                    "(compile=True, cuda_graphs=True), graphs+nhwc_norm (graphs with the GroupNorms of "
                    "channels_last_group_norm.py); the first is the one named 'ours'")
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
    return a


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
    if "eager" not in a.ours:
        a.ours = ["eager", *a.ours]
    init_device(device)
    with_ref = not a.no_reference and reference_available()
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
            result["tasks"][task] = time_task(task, a, device, dtype, with_ref)
        if not a.no_isolate:
            result["memory"][task] = memory_runs(task, a, with_ref)
        print(json.dumps({task: result["tasks"].get(task), "memory": result["memory"].get(task)}), flush=True)
    result["env"]["load_average_at_end"] = os.getloadavg()
    text = markdown(result)
    print(text, flush=True)
    if a.markdown:
        a.markdown.write_text(text)
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
