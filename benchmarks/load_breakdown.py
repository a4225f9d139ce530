"""Where a load's time goes: ours against the reference's dedicated pipeline, in one process, interleaved.

    python benchmarks/load_breakdown.py CKPT [--device cuda] [--tasks text_to_image ...] [--repeats 5] [--json F]

For each task: one untimed load of each implementation (imports, CUDA context and the page cache are warm after
it), then `--repeats` timed loads of each, alternating; then one load of ours under cProfile, summed by phase
(the functions in PHASES, cumulative seconds of the main thread: the CLIP tokenizer loads in another). bench.py's fresh-
process runs give first-load times; these are the steady-state ones, with more samples.
"""

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (DTYPES, device_name, free, init_device, load_ours, load_reference, preimport,  # noqa: E402
                   reference_available, sync, versions)

# (file suffix, function name) -> phase
PHASES = {
    ("vd/loading.py", "resolve"): "open the checkpoint (configs, headers)",
    ("weights_convert/checkpoint.py", "build_meta"): "build the modules on the meta device",
    ("weights_convert/checkpoint.py", "validate"): "check the parts against the modules",
    ("weights_convert/checkpoint.py", "load_parts"): "read the weights (and copy them to the device)",
    ("torch/nn/modules/module.py", "load_state_dict"): "assign the weights to the modules",
    ("vd/fast.py", "speed_up_"): "fast path: channels-last, stacked projections",
}


def load_once(impl: str, ckpt: Path, task: str, device: torch.device, dtype: torch.dtype) -> float:
    t = time.perf_counter()
    pipe = load_ours(ckpt, task, device, dtype) if impl == "ours" else load_reference(ckpt, task, device, dtype)
    sync(device)
    seconds = time.perf_counter() - t
    del pipe
    free(device)  # collects the pipeline and returns its device memory
    return seconds


def phases(ckpt: Path, task: str, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    profiler = cProfile.Profile()
    t = time.perf_counter()
    profiler.enable()
    pipe = load_ours(ckpt, task, device, dtype)
    sync(device)
    profiler.disable()
    total = time.perf_counter() - t
    del pipe
    free(device)
    out = {"total (under the profiler)": total}
    for (file, _, name), row in pstats.Stats(profiler).stats.items():
        for (suffix, fn), phase in PHASES.items():
            if name == fn and file.endswith(suffix):
                out[phase] = out.get(phase, 0.0) + row[3]  # cumulative time
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--tasks", nargs="+", default=["text_to_image", "image_variation"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    dtype = DTYPES[a.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    impls = ["ours"] + (["reference"] if reference_available() else [])
    for impl in impls:
        preimport(impl)
    init_device(device)
    result = {"device": device_name(device), "versions": versions(), "tasks": {}}
    for task in a.tasks:
        times: dict[str, list[float]] = {impl: [] for impl in impls}
        for impl in impls:
            load_once(impl, a.ckpt, task, device, dtype)  # untimed
        for i in range(a.repeats):
            for impl in impls if i % 2 == 0 else impls[::-1]:
                times[impl].append(load_once(impl, a.ckpt, task, device, dtype))
        r = {impl: dict(median_s=statistics.median(ts), all_s=ts) for impl, ts in times.items()}
        r["phases_ours"] = phases(a.ckpt, task, device, dtype)
        result["tasks"][task] = r
        print(task, json.dumps(r), flush=True)
    print(markdown(result))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return result


def markdown(r: dict) -> str:
    lines = [f"{r['device']}; torch {r['versions']['torch']}, diffusers {r['versions']['diffusers']}", "",
             "| task | load ours (s, median) | reference dedicated (s, median) | ours/ref |", "|---|---|---|---|"]
    for task, t in r["tasks"].items():
        ref = t.get("reference", {}).get("median_s")
        ours = t["ours"]["median_s"]
        lines.append(f"| {task} | {ours:.3f} | {'—' if ref is None else f'{ref:.3f}'} | "
                     f"{'—' if ref is None else f'{ours / ref:.2f}'} |")
    for task, t in r["tasks"].items():
        lines += ["", f"{task}, ours under cProfile (cumulative s):", ""]
        lines += [f"- {phase}: {s:.3f}" for phase, s in t["phases_ours"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
