"""Why torch.compile gained nothing on our UNet (issue 19, item 2): what inductor makes of two SD-sized blocks.

    python benchmarks/compile_probe.py [--device cuda] [--code OUT.py] [--json F] [--markdown F]

Compiles one ResnetBlock and one SpatialTransformer of vd.nn (640 channels at 32x32, batch 2, 77 context tokens:
the image UNet's second level, in its fast-path form: channels-last, stacked attention projections; fp16 on CUDA)
with inductor, keeps the code it generates (--code: every kernel's source and the wrapper that launches them) and
summarises it: the kernels in launch order, the library calls (convolutions, matmuls, attention), the layout of
every 4-D buffer it allocates (an NCHW buffer in a channels-last block is a layout copy), which ops each kernel
fuses (GroupNorm with SiLU? the time-embedding and residual adds?), the first loads of each GroupNorm kernel (how
it indexes the channels-last input), and the time of each block eager and compiled (on CUDA also each replayed
from a CUDA graph, which leaves kernel time only; and the compiled block's kernel times from the profiler). On a
CPU inductor writes C++ instead of Triton: smoke runs with small --channels/--size.
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vd.checks import DTYPES  # noqa: E402
from vd.fast import speed_up_  # noqa: E402
from vd.nn.layers import ResnetBlock, SpatialTransformer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_breakdown import graph_of, median_ms  # noqa: E402

KERNEL_DEF = re.compile(r"^(\w+) = async_compile\.(triton|cpp_pybinding|cpp)\(", re.M)
BUFFER = re.compile(r"(buf\d+) = empty_strided_\w+\(\(([\d, ]+)\), \(([\d, ]+)\)")
LIBRARY = re.compile(r"(extern_kernels\.\w+|torch\.ops\.\w+\.\w+(?:\.\w+)?|aten\.\w+(?:\.\w+)?)\(")


def blocks(a, device: torch.device, dtype: torch.dtype) -> dict:
    """name -> (module, inputs), in the fast path's layout."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)
    x = randn(a.batch, a.channels, a.size, a.size).contiguous(memory_format=torch.channels_last)
    resnet = ResnetBlock(a.channels, a.channels, a.temb, a.groups, 1e-5)
    transformer = SpatialTransformer(a.channels, a.heads, a.context_dim, depth=1, groups=a.groups)
    out = {}
    for name, module, inputs in (("ResnetBlock", resnet, (x, randn(a.batch, a.temb))),
                                 ("SpatialTransformer", transformer, (x, randn(a.batch, a.tokens, a.context_dim)))):
        module = module.to(device, dtype).eval()
        speed_up_(module)  # channels-last, stacked projections
        with torch.no_grad():
            for p in module.parameters():  # norms' affine terms away from 1 and 0, like trained weights
                p.add_(torch.randn(p.shape, generator=g).to(device, dtype) * 0.02)
        out[name] = (module, inputs)
    return out


def launches(code: str) -> list[str]:
    """What the wrapper's call() launches, in order: generated kernels by name, library calls as named."""
    kernels = set(m.group(1) for m in KERNEL_DEF.finditer(code))
    body = code[code.rfind("def call("):]
    out = []
    for line in body.splitlines():
        line = line.strip()
        if line.startswith("#") or line.startswith("assert_size_stride"):
            continue
        head = re.match(r"(\w+)(?:\.run)?\(", line)
        if head and head.group(1) in kernels:
            out.append(head.group(1))
        elif lib := LIBRARY.search(line):
            out.append(lib.group(1))
    return out


def layout(shape: list[int], stride: list[int]) -> str:
    n, c, h, w = shape
    if stride == [c * h * w, h * w, w, 1]:
        return "NCHW"
    if stride == [c * h * w, 1, w * c, c]:
        return "channels-last"
    return "other"


def group_norm_loads(code: str, name: str, limit: int = 4) -> list[str]:
    """The first loads in a kernel's source (between the quotes after `name = async_compile...(`): how it walks
    its input."""
    start = code.find(f"{name} = async_compile")
    opened = code.find("'''", start) + 3
    src = code[opened:code.find("'''", opened)] if start >= 0 else ""
    loads = [ln.strip() for ln in src.splitlines() if "tl.load(" in ln or re.search(r"in_ptr\d+ \+", ln)]
    return list(dict.fromkeys(loads))[:limit]


def analyse(code: str, activation: tuple[int, ...]) -> dict:
    """The summary of one block's generated code; `activation`: the block's input shape (N, C, H, W), to tell
    activation buffers from statistics buffers."""
    kernels = [m.group(1) for m in KERNEL_DEF.finditer(code)]
    buffers = [(b, [int(v) for v in s.split(",") if v.strip()], [int(v) for v in t.split(",") if v.strip()])
               for b, s, t in BUFFER.findall(code)]
    four_d = [(b, s, t, layout(s, t)) for b, s, t in buffers
              if len(s) == 4 and s[0] == activation[0] and s[2:] == list(activation[2:])]
    norms = [k for k in kernels if "group_norm" in k]
    order = launches(code)
    convs = re.findall(r"extern_kernels\.convolution\((\w+), (\w+), (\w+)", code)
    return {
        "kernels": kernels, "launches": order,
        "library_calls": [x for x in order if x not in kernels],
        "buffers_4d": [{"buffer": b, "shape": s, "stride": t, "layout": lay} for b, s, t, lay in four_d],
        "nchw_buffers": sum(lay == "NCHW" for *_, lay in four_d),
        "group_norm_kernels": {k: {"silu": "silu" in k, "add": "add" in k, "loads": group_norm_loads(code, k)}
                               for k in norms},
        "silu_outside_group_norm": [k for k in kernels if "silu" in k and "group_norm" not in k],
        "conv_bias_in_library_call": [bias != "None" for *_, bias in convs],
        "last_launch": order[-1] if order else None,
    }


def kernel_times(fn, calls: int = 10) -> dict[str, float]:
    """Device microseconds per call of each kernel fn launches (CUDA profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if us:
            out[e.key] = us / calls
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:20])


@torch.no_grad()
def probe(name: str, module, inputs, a, device: torch.device) -> tuple[dict, str]:
    from torch._inductor.utils import run_and_get_code
    compiled = torch.compile(module, mode=None if a.mode == "default" else a.mode, dynamic=False)
    t = time.perf_counter()
    out, codes = run_and_get_code(compiled, *inputs)
    compile_s = time.perf_counter() - t
    want = module(*inputs)
    code = "\n\n".join(codes)
    r = {"compile_s": compile_s, "rel_diff": ((out.float() - want.float()).norm() / want.float().norm()).item(),
         "output_channels_last": out.is_contiguous(memory_format=torch.channels_last),
         **analyse(code, tuple(inputs[0].shape))}
    calls = {"eager": lambda: module(*inputs), "compiled": lambda: compiled(*inputs)}
    if device.type == "cuda":
        calls.update({"eager, CUDA graph": graph_of(calls["eager"], device),
                      "compiled, CUDA graph": graph_of(calls["compiled"], device)})
    r["ms"] = {k: median_ms(fn, device, a.repeats) for k, fn in calls.items()}
    if device.type == "cuda":
        r["kernel_us"] = kernel_times(calls["compiled"])
    return r, f"# ===== {name}: code inductor generated (mode {a.mode}) =====\n{code}"


def summary(name: str, r: dict) -> list[str]:
    yes = {True: "yes", False: "no"}
    norms = r["group_norm_kernels"]
    lines = [f"#### {name}", "",
             "| " + " | ".join(r["ms"]) + " | compile (s) | rel. diff to eager |",
             "|" + "---|" * (len(r["ms"]) + 2),
             "| " + " | ".join(f"{v:.3f} ms" for v in r["ms"].values()) + f" | {r['compile_s']:.1f} "
             f"| {r['rel_diff']:.1e} |", "",
             f"- {len(r['launches'])} launches per call: {len(r['launches']) - len(r['library_calls'])} generated "
             f"kernels, {len(r['library_calls'])} library calls ({', '.join(r['library_calls']) or 'none'}).",
             f"- Generated kernels: {', '.join(f'`{k}`' for k in r['kernels']) or 'none'}.",
             "- GroupNorm fused with SiLU: " + (", ".join(f"`{k}` {yes[v['silu']]}" for k, v in norms.items()) or "-")
             + f"; SiLU in kernels without a GroupNorm: {', '.join(r['silu_outside_group_norm']) or 'none'}.",
             f"- GroupNorm kernels with an add fused in (time embedding / residual): "
             f"{', '.join(k for k, v in norms.items() if v['add']) or 'none'}.",
             f"- Convolution bias inside the library call: {r['conv_bias_in_library_call'] or '-'}; "
             f"last launch (the residual add, if its own kernel): `{r['last_launch']}`.",
             f"- Activation buffers allocated (the block's batch and size): {len(r['buffers_4d'])}, of which NCHW (a "
             f"layout change in a channels-last block): {r['nchw_buffers']}; output channels-last: "
             f"{yes[r['output_channels_last']]}."]
    for k, v in norms.items():
        lines.append(f"- First loads of `{k}`: " + "; ".join(f"`{ld}`" for ld in v["loads"]))
    if "kernel_us" in r:
        lines.append("- Device time per call of the compiled block's kernels (µs): "
                     + ", ".join(f"{k} {v:.1f}" for k, v in r["kernel_us"].items()))
    return lines + [""]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), help="default fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--mode", default="default", choices=("default", "max-autotune-no-cudagraphs"),
                    help="torch.compile mode (default: what compile=True uses; no CUDA-graph modes, the probe "
                    "captures its own graphs)")
    ap.add_argument("--channels", type=int, default=640)
    ap.add_argument("--size", type=int, default=32, help="height and width of the feature map")
    ap.add_argument("--batch", type=int, default=2, help="2 = one image with classifier-free guidance")
    ap.add_argument("--tokens", type=int, default=77)
    ap.add_argument("--context-dim", type=int, default=768)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--temb", type=int, default=1280, help="time-embedding width")
    ap.add_argument("--groups", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--code", type=Path, help="write the generated code of both blocks here")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    a = ap.parse_args(argv)
    a.dtype = a.dtype or ("fp16" if a.device.startswith("cuda") else "fp32")
    if a.channels % a.groups or a.channels % a.heads:
        ap.error(f"--channels ({a.channels}) must be divisible by --groups ({a.groups}) and --heads ({a.heads})")
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    device = torch.device(a.device)
    results, codes = {}, []
    for name, (module, inputs) in blocks(a, device, DTYPES[a.dtype]).items():
        results[name], code = probe(name, module, inputs, a, device)
        codes.append(code)
        print(json.dumps({name: {k: results[name][k] for k in ("ms", "compile_s", "kernels", "nchw_buffers")}}),
              flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    md = [f"### torch.compile probe: {name}, torch {torch.__version__}, {a.dtype}, mode {a.mode}, "
          f"{a.channels} channels at {a.size}x{a.size}, batch {a.batch}, channels-last", ""]
    for block, r in results.items():
        md += summary(block, r)
    text = "\n".join(md)
    print(text, flush=True)
    if a.code:
        a.code.write_text("\n\n".join(codes))
    if a.markdown:
        a.markdown.write_text(text)
    result = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}, "device": name,
              "torch": torch.__version__, "blocks": results}
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
