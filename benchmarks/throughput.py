"""Throughput for bench.py (--throughput-batches): images per second of whole task calls at several batch sizes,
the implementations loaded in one process and interleaved, with the device memory each batch needs.

A batch is `num_images_per_prompt` images from one prompt (both implementations take that argument), so the UNet
runs at 2 x batch with classifier-free guidance. Per batch and implementation: one short first call at that
batch (2 steps: CUDA-graph capture, compilation, cuDNN autotuning for the new shapes; its seconds are kept), then
--throughput-repeats full calls, interleaved across implementations; images/s = batch / median seconds.
Peak memory = the implementation's weights (device bytes its load allocated) + the most the short first call
allocated above what the process held before it (a step's peak does not grow with the number of steps). A
CUDA graph's activations are allocated while it is captured, so the peak is measured only for shapes this
process has not run before (`seen`).
"""

import statistics
import traceback

import torch

from bench import free, interleaved, sync, task_kwargs, timed


def measure_throughput(task: str, impls: list, a, device: torch.device, out: dict, save,
                       seen: set[int] = frozenset()) -> None:
    """Fills out[str(batch)][impl.name] batch by batch, calling save() after each, so a run cut short keeps
    the batches it finished. An implementation that fails at a batch is recorded with its error there and left
    out of the larger batches."""
    for batch in a.throughput_batches:
        def kw(steps: int) -> dict:
            return dict(task_kwargs(task, a.size, steps, a.guidance), num_images_per_prompt=batch)
        row = out[str(batch)] = {impl.name: {} for impl in impls}
        for impl in list(impls):
            free(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
            if base is not None:
                torch.cuda.reset_peak_memory_stats(device)
            try:
                row[impl.name]["first_call_s"] = timed(lambda: impl.run(task, **kw(min(2, a.steps))), device)
            except Exception as e:  # out of memory at a large batch, say: the others go on without it
                traceback.print_exc()
                row[impl.name]["error"] = f"{type(e).__name__}: {e}"
                impls.remove(impl)
                continue
            if base is not None and batch not in seen and impl.resident is not None:
                sync(device)
                row[impl.name]["peak_bytes"] = impl.resident + torch.cuda.max_memory_allocated(device) - base
        times = interleaved(impls, lambda impl: impl.run(task, **kw(a.steps)), a.throughput_repeats, device)
        for name, t in times.items():
            row[name].update(seconds=statistics.median(t), seconds_all=t, images_per_s=batch / statistics.median(t))
        print(f"throughput {task} batch {batch}: " + ", ".join(
            f"{name} {r['images_per_s']:.3g} img/s" for name, r in row.items() if "images_per_s" in r), flush=True)
        save()
