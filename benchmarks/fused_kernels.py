"""The fused Triton kernels (vd/kernels) against the torch ops they replace, shape by shape, and whole models with
and without them (ours only, one process, no checkpoint: random weights).

    python benchmarks/fused_kernels.py [--repeats 50] [--candidates ...] [--no-models] [--json OUT] [--markdown OUT]
    python benchmarks/fused_kernels.py --device cpu --repeats 1 --limit 2 --json OUT  # smoke: Triton's interpreter

1. The shapes: every GroupNorm, GEGLU and residual add + LayerNorm call of one guided step of VD's image UNet at
   512x512 (batch 2, 77 text tokens; channels-last, as the fast path runs it) and of the VAE decoder (batch 1,
   NCHW), found by running the real configs on the meta device; each distinct call with its count.
2. Per shape, GPU time of torch's ops as the plain path runs them (shift add, GroupNorm, SiLU; for a
   channels-last input also the copy back to channels-last that the next convolution makes), of torch on an
   NCHW copy (its GroupNorm without layout copies), and of the kernel; each from a CUDA graph of 10 calls, median
   of `--repeats` replays (CUDA events), and the kernel's GB/s over the bytes it must move (read the input once,
   write the output). Off CUDA: wall time of eager calls, a smoke test only.
3. GroupNorm candidates `TILE:TILES_PER_CHUNK:WARPS[:GROUPS_PER_PROGRAM]` (without the last: the launcher's choice,
   several groups per program in channels-last memory; `:1` is one group per program, the kernel before that) on
   every distinct GroupNorm shape: the fastest per shape, and the total over a step and a decode (each shape times
   its count); the fastest total is printed.
4. Models: the UNet step from a CUDA graph (vd.fast.NoisePredictor) and eager, and the VAE decode (eager), with
   and without `use_triton_kernels_`; the graph's first call (capture, and Triton's compiles; Triton caches them
   on disk, so a second process compiles nothing); the outputs' relative difference.
"""

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere without installing vd
from vd.fast import NoisePredictor, speed_up_, use_triton_kernels_  # noqa: E402
from vd.nn import AutoencoderKL, Context, UNet  # noqa: E402
from vd.nn.config import VD_IMAGE_UNET, VD_TEXT_UNET, VD_VAE  # noqa: E402
from vd.nn.fusable import GroupNorm, LayerNorm  # noqa: E402
from vd.nn.layers import GEGLU  # noqa: E402

from fp16_check import rel  # noqa: E402
from make_checkpoint import randomize  # noqa: E402
from step_breakdown import graph_of  # noqa: E402

CANDIDATES = "1024:1:4,2048:1:4,4096:1:4,4096:1:8,8192:1:8,2048:4:4,2048:1:4:1,4096:1:8:1"
TINY = dict(block_channels=(16, 32), down_attention=(True, False), up_attention=(False, True), layers_per_block=(1, 1),
            num_heads=(2, 2), context_dim=(16, 16), transformer_depth=(1, 1), only_cross_attention=(False, False),
            norm_groups=4)  # two levels: the smoke run's interpreted kernels take ~0.1 s a call


def configs(device: torch.device):
    """(image UNet, text UNet, VAE configs, latent size, tokens) at full size on CUDA, tiny elsewhere."""
    if device.type == "cuda":
        return VD_IMAGE_UNET, VD_TEXT_UNET, VD_VAE, 64, (77, 768)
    return (replace(VD_IMAGE_UNET, **TINY), replace(VD_TEXT_UNET, **TINY),
            replace(VD_VAE, block_channels=(8, 16), layers_per_block=1, norm_groups=4), 8, (5, 16))


def find_calls(model, run) -> Counter:
    """Distinct (kind, shape, flags) of the hooked layers' calls while `run()` runs on the meta device."""
    calls, handles = Counter(), []

    def on_group_norm(m, args, kwargs):
        shift = args[1] if len(args) > 1 else kwargs.get("shift")
        calls["group_norm", tuple(args[0].shape), m.num_groups, shift is not None, kwargs.get("silu", False)] += 1

    for name, m in model.named_modules():
        if isinstance(m, GroupNorm):
            handles.append(m.register_forward_pre_hook(on_group_norm, with_kwargs=True))
        elif isinstance(m, GEGLU):
            handles.append(m.proj.register_forward_hook(lambda m, a, out: calls.update([("geglu", tuple(out.shape))])))
        elif isinstance(m, LayerNorm) and name.endswith(("norm2", "norm3")):  # the ones add_norm calls
            handles.append(m.register_forward_pre_hook(lambda m, a: calls.update([("add_layer_norm",
                                                                                   tuple(a[0].shape))])))
    with torch.no_grad():
        run()
    for h in handles:
        h.remove()
    return calls


def model_calls(device: torch.device) -> dict[str, Counter]:
    unet_cfg, _, vae_cfg, size, (n_tokens, dim) = configs(device)
    with torch.device("meta"):
        unet, vae = UNet(unet_cfg), AutoencoderKL(vae_cfg, parts=frozenset({"decoder"}))
        x, tokens, z = torch.empty(2, 4, size, size), torch.empty(2, n_tokens, dim), torch.empty(1, 4, size, size)
    return {"unet": find_calls(unet, lambda: unet(x, torch.tensor(500, device="meta"),
                                                  [Context(unet.context_layers(), tokens)])),
            "vae": find_calls(vae, lambda: vae.decode(z))}


def time_ms(fn, device: torch.device, repeats: int, inner: int = 10, graph: bool = True) -> float:
    """GPU ms per call from a CUDA graph of `inner` calls (median of `repeats` replays), or between CUDA events
    around eager calls (`graph=False`); off CUDA eager wall time."""
    if device.type != "cuda":
        return statistics.median(_wall(fn) for _ in range(repeats)) * 1e3
    fn()  # compiles (Triton) and warms up
    if not graph:
        return statistics.median(_events_ms(fn) for _ in range(repeats))
    calls = graph_of(lambda: [fn() for _ in range(inner)], device)
    return statistics.median(_events_ms(calls) for _ in range(repeats)) / inner


def _events_ms(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _wall(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def group_norm_ops(shape, groups, with_shift, silu, channels_last, dtype, device):
    """(torch as the plain path runs it, torch on NCHW memory, fused with knobs) for one GroupNorm call."""
    from vd.kernels.group_norm import group_norm
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(shape, generator=g, device=device, dtype=dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(memory_format=fmt)
    w = 1 + 0.1 * torch.randn(shape[1], device=device, dtype=dtype)
    b = 0.1 * torch.randn(shape[1], device=device, dtype=dtype)
    shift = torch.randn(shape[:2], device=device, dtype=dtype) if with_shift else None
    nchw = x.contiguous()

    def plain(t=x):
        y = F.group_norm(t + shift[:, :, None, None] if with_shift else t, groups, w, b, 1e-5)
        return (F.silu(y) if silu else y).contiguous(memory_format=fmt)  # the next conv wants the input's format
    return plain, lambda: plain(nchw), lambda **knobs: group_norm(x, w, b, groups, 1e-5, shift, silu, **knobs)


def bench_shapes(calls: dict[str, Counter], device, dtype, repeats: int, candidates: dict[str, dict],
                 limit: int | None = None):
    from vd.kernels.geglu import geglu
    from vd.kernels.layer_norm import add_layer_norm
    rows, cand = [], {}
    size = torch.finfo(dtype).bits // 8
    for model, counter in calls.items():
        channels_last = model == "unet"
        seen = Counter()
        for (kind, shape, *flags), count in sorted(counter.items(), key=lambda kv: (kv[0][0], -kv[1], str(kv))):
            seen[kind] += 1
            if limit is not None and seen[kind] > limit:
                continue
            numel = torch.Size(shape).numel()
            if kind == "group_norm":
                groups, with_shift, silu = flags
                plain, nchw, fused = group_norm_ops(shape, groups, with_shift, silu, channels_last, dtype, device)
                row = dict(torch_ms=time_ms(plain, device, repeats), torch_nchw_ms=time_ms(nchw, device, repeats),
                           fused_ms=time_ms(fused, device, repeats), rel_diff=rel(fused(), plain()),
                           bytes=2 * numel * size, shift=with_shift, silu=silu)
                key = (model, shape, groups)
                if candidates and key not in cand:  # every candidate once per shape, weighted by all its calls
                    cand[key] = dict(count=0, ms={name: time_ms(lambda: fused(**knobs), device, repeats)
                                                  for name, knobs in candidates.items()})
                if candidates:
                    cand[key]["count"] += count
            elif kind == "geglu":
                h = torch.randn(shape, device=device, dtype=dtype)
                a, gate = h.chunk(2, dim=-1)
                row = dict(torch_ms=time_ms(lambda: a * F.gelu(gate), device, repeats),
                           fused_ms=time_ms(lambda: geglu(h), device, repeats),
                           rel_diff=rel(geglu(h), a * F.gelu(gate)), bytes=numel * size * 3 // 2)
            else:
                x, r = torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype)
                w = 1 + 0.1 * torch.randn(shape[-1], device=device, dtype=dtype)
                b = 0.1 * torch.randn(shape[-1], device=device, dtype=dtype)

                def plain_ln():
                    s = x + r
                    return s, F.layer_norm(s, (shape[-1],), w, b, 1e-5)
                row = dict(torch_ms=time_ms(plain_ln, device, repeats),
                           fused_ms=time_ms(lambda: add_layer_norm(x, r, w, b, 1e-5), device, repeats),
                           rel_diff=rel(add_layer_norm(x, r, w, b, 1e-5)[1], plain_ln()[1]), bytes=4 * numel * size)
            row.update(model=model, kind=kind, shape=list(shape), count=count,
                       fused_gbps=row["bytes"] / row["fused_ms"] / 1e6)
            rows.append(row)
            print(f"{model} {kind} {shape} x{count}: torch {row['torch_ms']:.4f} ms, fused {row['fused_ms']:.4f} ms "
                  f"({row['fused_gbps']:.0f} GB/s), rel diff {row['rel_diff']:.1e}", flush=True)
    return rows, cand


def candidate_totals(cand: dict) -> dict:
    """Per model and candidate: the GroupNorm time of one step (decode), each shape times its count."""
    totals: dict[str, dict[str, float]] = {}
    for (model, _, _), c in cand.items():
        for name, ms in c["ms"].items():
            totals.setdefault(model, {}).setdefault(name, 0.0)
            totals[model][name] += ms * c["count"]
    return totals


@torch.no_grad()
def bench_models(device, dtype, repeats: int) -> dict:
    unet_cfg, text_cfg, vae_cfg, size, (n_tokens, dim) = configs(device)
    with torch.device("meta"):
        image = UNet(unet_cfg, parts=frozenset({"global", "data"}))
        text = UNet(text_cfg, parts=frozenset({"context"}))
        vae = AutoencoderKL(vae_cfg, parts=frozenset({"decoder"}))
    image, text, vae = (randomize(m, dtype, device, i) for i, m in enumerate((image, text, vae)))
    speed_up_(image, text)  # the UNets channels-last, the VAE NCHW: as the pipeline runs them on a GPU
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(2, 4, size, size, generator=g, device=device, dtype=dtype)
    streams = [Context(text.context_layers(), torch.randn(2, n_tokens, dim, generator=g, device=device, dtype=dtype))]
    z = torch.randn(1, 4, size, size, generator=g, device=device, dtype=dtype)
    t = torch.tensor(500, device=device)
    out = {}
    for name, devices in (("plain", ()), ("kernels", (device.type,))):
        use_triton_kernels_(image, text, vae.decoder, devices=devices)
        step, eager = NoisePredictor(image, cuda_graphs=True), NoisePredictor(image)
        t0 = time.perf_counter()
        eps = step(x, t, streams)  # captures the graph (and compiles the kernels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        # the step replays its own graph: timed between events, as the decode (eager, as the pipeline runs it)
        out[name] = dict(step_first_call_s=time.perf_counter() - t0, eps=eps, image=vae.decode(z),
                         step_ms=time_ms(lambda: step(x, t, streams), device, repeats, graph=False),
                         step_eager_ms=time_ms(lambda: eager(x, t, streams), device, max(3, repeats // 5), graph=False)
                         if device.type == "cuda" else None,  # off CUDA both are the same eager call
                         decode_ms=time_ms(lambda: vae.decode(z), device, max(3, repeats // 5), graph=False))
        first = out[name]["step_first_call_s"]
        print(f"{name}: step {out[name]['step_ms']:.3f} ms (first call {first:.2f} s, eager "
              f"{out[name]['step_eager_ms'] or out[name]['step_ms']:.3f} ms), "
              f"decode {out[name]['decode_ms']:.3f} ms", flush=True)
    result = {k: {m: v for m, v in d.items() if not isinstance(v, torch.Tensor)} for k, d in out.items()}
    result["step_rel_diff"] = rel(out["kernels"]["eps"], out["plain"]["eps"])
    result["decode_rel_diff"] = rel(out["kernels"]["image"], out["plain"]["image"])
    return result


def markdown(r: dict) -> str:
    lines = [f"# vd/kernels: {r['device']}, {r['dtype']}, torch {r['torch']}, triton {r['triton']}", "",
             "| model | kind | shape | calls | flags | torch (ms) | torch NCHW (ms) | fused (ms) | torch/fused | "
             "fused GB/s | rel diff |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["shapes"]:
        flags = "+".join(f for f in ("shift", "silu") if x.get(f)) or "-"
        nchw = f"{x['torch_nchw_ms']:.4f}" if "torch_nchw_ms" in x else ""
        lines.append(f"| {x['model']} | {x['kind']} | {'x'.join(map(str, x['shape']))} | {x['count']} | {flags} | "
                     f"{x['torch_ms']:.4f} | {nchw} | {x['fused_ms']:.4f} | {x['torch_ms'] / x['fused_ms']:.2f} | "
                     f"{x['fused_gbps']:.0f} | {x['rel_diff']:.1e} |")
    for model in ("unet", "vae"):
        rows = [x for x in r["shapes"] if x["model"] == model]
        torch_ms, fused_ms = (sum(x[k] * x["count"] for x in rows) for k in ("torch_ms", "fused_ms"))
        lines.append(f"\n{model}: these ops take {torch_ms:.3f} ms per {'step' if model == 'unet' else 'decode'} "
                     f"in torch, {fused_ms:.3f} ms fused.")
    for model, totals in r["candidate_totals"].items():
        best = min(totals, key=totals.get)
        lines.append(f"\nGroupNorm candidates (tile:tiles per chunk:warps[:groups per program]), {model}, "
                     "ms per pass: "
                     + ", ".join(f"{k} {v:.3f}" for k, v in totals.items()) + f"; fastest {best}.")
    if r.get("models"):
        m = r["models"]
        lines += ["", "| | UNet step from a graph (ms) | first call (s) | UNet step, eager (ms) | "
                  "VAE decode, eager (ms) |", "|---|---|---|---|---|"]
        for k in ("plain", "kernels"):
            eager = m[k]["step_eager_ms"] or m[k]["step_ms"]
            lines.append(f"| {k} | {m[k]['step_ms']:.3f} | {m[k]['step_first_call_s']:.2f} | {eager:.3f} | "
                         f"{m[k]['decode_ms']:.3f} |")
        lines.append(f"\nrel diff of the outputs: step {m['step_rel_diff']:.1e}, decode {m['decode_rel_diff']:.1e}")
    return "\n".join(lines) + "\n"


def parse_candidates(text: str) -> dict[str, dict]:
    """{"TILE:TILES_PER_CHUNK:WARPS[:GROUPS_PER_PROGRAM]": group_norm's knobs}."""
    out = {}
    for name in filter(None, text.split(",")):
        try:
            values = [int(v) for v in name.split(":")]
        except ValueError:
            values = []
        if len(values) not in (3, 4):
            raise SystemExit(f"--candidates: expected TILE:TILES_PER_CHUNK:WARPS[:GROUPS_PER_PROGRAM],..., "
                             f"got {text!r}")
        out[name] = dict(zip(("tile", "tiles_per_chunk", "num_warps", "group_block"), values))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--candidates", default=CANDIDATES, help="GroupNorm knobs to compare ('' for none)")
    p.add_argument("--no-models", action="store_true", help="skip the whole UNet step and VAE decode")
    p.add_argument("--limit", type=int, help="at most this many distinct shapes per model and kind (smoke runs)")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    a = p.parse_args()
    candidates = parse_candidates(a.candidates)
    if a.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # the kernels take CPU tensors only in Triton's interpreter
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu for the smoke run")
    import triton
    device, dtype = torch.device(a.device), torch.float16 if a.device == "cuda" else torch.float32
    r = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)",
             dtype=str(dtype), torch=torch.__version__, triton=triton.__version__, repeats=a.repeats)
    r["shapes"], cand = bench_shapes(model_calls(device), device, dtype, a.repeats, candidates, a.limit)
    r["candidates"] = [dict(model=k[0], shape=list(k[1]), groups=k[2], **v) for k, v in cand.items()]
    r["candidate_totals"] = candidate_totals(cand)
    for model, totals in r["candidate_totals"].items():
        print(f"fastest GroupNorm candidate for the {model}: {min(totals, key=totals.get)} "
              f"({min(totals.values()):.3f} ms per pass)", flush=True)
    r["models"] = None if a.no_models else bench_models(device, dtype, a.repeats)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(r, indent=1))
    if a.markdown:
        a.markdown.parent.mkdir(parents=True, exist_ok=True)
        a.markdown.write_text(markdown(r))
    print(markdown(r))


if __name__ == "__main__":
    main()
