"""Peak host memory and time of loading: each task's parts against all parts, ours against diffusers'.

    python benchmarks/load_rss.py CKPT [--device cpu] [--dtype fp32] [--json F] [--markdown F]

Every row runs in a fresh process. Peak RSS is VmHWM (/proc/self/status), which starts afresh at exec (ru_maxrss
would carry over the high-water mark of the process that spawned the child). Our loader memory-maps safetensors
files, so a float32 CPU load may leave the weights on disk until first used: the column "after reading every
weight" touches each parameter once and shows what the weights cost when the pipeline runs. Load time is from
the files (warm in the page cache) to a pipeline ready on the device.
"""

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bench import (DTYPES, TASKS, device_name, init_device, load_reference, preimport, reference_available, sync,
                   versions, vm_hwm)

GIB = 2**30
DESCRIBE = {
    "dedicated": "diffusers VersatileDiffusionTextToImagePipeline, remove_unused_weights()",
    "all_in_one": "diffusers VersatileDiffusionPipeline (all components)",
}


def modules(pipe) -> list[nn.Module]:
    """The torch modules a loaded pipeline holds (ours: its Components; diffusers: its components dict)."""
    parts = pipe.components.values() if isinstance(pipe.components, dict) else vars(pipe.components).values()
    return [m for m in parts if isinstance(m, nn.Module)]


@torch.no_grad()
def touch(pipe) -> None:
    """Read every weight once (pages in what a memory-mapped load left on disk)."""
    for m in modules(pipe):
        for p in m.parameters():
            p.sum()


def load(impl: str, what: str, ckpt: Path, device: torch.device, dtype: torch.dtype):
    if impl == "ours":
        from vd import VersatileDiffusion
        return VersatileDiffusion.from_pretrained(ckpt, tasks=what.split(","), device=device, dtype=dtype)
    return load_reference(ckpt, "text_to_image", device, dtype, what).pipe


def child(a) -> None:
    impl, _, what = a.child.partition(":")
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    out = {"import_s": preimport(impl)}
    init_device(device)
    out["rss_before"] = vm_hwm()
    t0 = time.perf_counter()
    pipe = load(impl, what, a.ckpt, device, dtype)
    sync(device)
    out["load_s"], out["rss_load"] = time.perf_counter() - t0, vm_hwm()
    t0 = time.perf_counter()
    touch(pipe)
    sync(device)
    out["touch_s"], out["rss_touched"] = time.perf_counter() - t0, vm_hwm()
    out["params"] = sum(p.numel() for m in modules(pipe) for p in m.parameters())
    print("CHILD " + json.dumps(out), flush=True)


def rows(tasks: list[str], with_reference: bool) -> list[tuple[str, str]]:
    """(implementation, what it loads): ours for each task and for all of them; the reference's two loads."""
    out = [("ours", t) for t in tasks] + ([("ours", ",".join(tasks))] if len(tasks) > 1 else [])
    return out + ([("reference", "dedicated"), ("reference", "all_in_one")] if with_reference else [])


def run_row(impl: str, what: str, a) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), str(a.ckpt), "--child", f"{impl}:{what}",
           "--device", a.device, "--dtype", a.dtype]
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("CHILD ")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
        print(f"{impl}:{what} failed:\n" + "\n".join(tail), file=sys.stderr)
        return {"error": tail[-1] if tail else f"exit {p.returncode}"}
    return json.loads(lines[-1][len("CHILD "):])


def table(results: list[dict]) -> str:
    lines = ["| loads | parameters (M) | peak RSS after load (GiB) | after reading every weight (GiB) "
             "| load time (s) | reading every weight (s) |", "|---|---|---|---|---|---|"]
    for r in results:
        name = f"ours, tasks=[{r['what']}]" if r["impl"] == "ours" else DESCRIBE[r["what"]]
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} |")
            continue
        lines.append(f"| {name} | {r['params'] / 1e6:.0f} | {r['rss_load'] / GIB:.2f} | {r['rss_touched'] / GIB:.2f} "
                     f"| {r['load_s']:.2f} | {r['touch_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a)
        return
    results = [dict(impl=impl, what=what, **run_row(impl, what, a))
               for impl, what in rows(a.tasks, not a.no_reference and reference_available())]
    v = versions()
    env = dict(device=device_name(torch.device(a.device)), versions=v,
               date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    text = (f"{env['device']}, {a.dtype}, {env['date']}; torch {v['torch']}, diffusers {v['diffusers']}, "
            f"transformers {v['transformers']}, accelerate {v['accelerate']}\n\n" + table(results))
    print(text)
    if a.markdown:
        a.markdown.write_text(text)
    if a.json:
        a.json.write_text(json.dumps(dict(env=env, settings=dict(ckpt=str(a.ckpt), device=a.device, dtype=a.dtype),
                                          rows=results), indent=1))


if __name__ == "__main__":
    main()
