"""Where our text_to_image time goes, to choose the next optimisation (ours only, one process, a few seconds).

    python benchmarks/step_breakdown.py CKPT [--device cuda] [--size 512] [--steps 50] [--repeats 20]
        [--compile MODE] [--cudnn-benchmark-limit N] [--json OUT]

1. Kernel time of one guided UNet step (batch 2, the prompt's 77 tokens) by kind: convolution, matmul,
   attention, GroupNorm, LayerNorm, layout copies, other elementwise; from the torch profiler over eager steps.
   Their sum is the device's busy time, which a CUDA-graph step approaches but cannot beat; the top kernels
   are listed by name. On a CPU the same table sorts aten ops instead of kernels. The same again with the
   GroupNorms of channels_last_group_norm.py (CUDA's GroupNorm kernel wants NCHW, so in a channels-last UNet
   each one costs two layout copies).
2. The CUDA-graph step with each SDPA backend first (flash, memory-efficient, cuDNN), with cuBLASLt for the
   matmuls, with those GroupNorms, and with `--compile MODE` (torch.compile of the UNet, then a CUDA graph).
   Each is checked against the default step's output.
   `--cudnn-benchmark-limit 0` makes cuDNN's autotuning try every convolution algorithm, for the whole run.
3. The VAE decode, eager and from a CUDA graph (how much of it is launch overhead), and eager with the decoder
   channels-last and those GroupNorms.
4. A whole text_to_image call with CUDA graphs, split into steps x graph step, the decode, and the rest.

Off CUDA everything runs eagerly (no graphs); that is only a smoke test of the script.
"""

import argparse
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import device_name, sync, timed, versions  # noqa: E402
from channels_last_group_norm import channels_last_group_norms_  # noqa: E402
from fp16_check import rel  # noqa: E402

# kernel (CUDA) or aten op (CPU) name -> kind; the first match wins
KINDS = [
    ("attention", r"flash|fmha|attention|sdpa"),
    ("convolution", r"conv|fprop|dgrad|implicit_gemm|winograd"),
    ("matmul", r"gemm|nvjet|cutlass|addmm|\bmm\b|bmm|matmul|linear"),
    ("group_norm", r"group_norm|GroupNorm|RowwiseMoments|ComputeFusedParams"),
    ("layer_norm", r"layer_norm|LayerNorm"),
    ("layout copies", r"nchwToNhwc|nhwcToNchw|copy|contiguous|clone"),
    ("elementwise", r"elementwise|vectorized|silu|gelu|add|mul|cat|Cat|upsample|interpolate"),
]


def kind_of(name: str) -> str:
    return next((k for k, pattern in KINDS if re.search(pattern, name)), "other")


def median_ms(fn, device: torch.device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device) for _ in range(repeats)) * 1e3


def kernel_table(fn, device: torch.device, calls: int) -> dict:
    """Self time per kernel (CUDA) or aten op (CPU) of `calls` calls of fn, per call, grouped by kind."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    fn()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])  # name -> [us, count]
    for e in prof.key_averages():
        if cuda:
            is_kernel = str(getattr(e, "device_type", "")).endswith("CUDA")
            us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        else:
            is_kernel, us = e.key.startswith("aten::"), e.self_cpu_time_total
        if is_kernel and us > 0:
            per_name[e.key][0] += us / calls
            per_name[e.key][1] += e.count / calls
    kinds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, (us, n) in per_name.items():
        kinds[kind_of(name)][0] += us
        kinds[kind_of(name)][1] += n
    top = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:15]
    return dict(total_ms=sum(us for us, _ in per_name.values()) / 1e3,
                kinds={k: dict(ms=us / 1e3, count=n) for k, (us, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0])},
                top=[dict(name=name[:160], ms=us / 1e3, count=n) for name, (us, n) in top])


def graph_of(fn, device: torch.device):
    """fn captured in a CUDA graph (replay returns its static output), or fn itself off CUDA."""
    if device.type != "cuda":
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out
    return replay


@torch.no_grad()
def main(argv=None) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vd.fast import NoisePredictor
    from vd.nn import Context
    from vd.pipeline import VersatileDiffusion

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--profile-calls", type=int, default=3)
    ap.add_argument("--compile", metavar="MODE", help="also torch.compile the UNet in this mode (e.g. default)")
    ap.add_argument("--cudnn-benchmark-limit", type=int, metavar="N",
                    help="cuDNN algorithms to try per convolution when autotuning (torch's default 10; 0: all)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    a = ap.parse_args(argv)
    if a.cudnn_benchmark_limit is not None:  # before any convolution is tuned: the choices are cached per process
        torch.backends.cudnn.benchmark_limit = a.cudnn_benchmark_limit
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    pipe = VersatileDiffusion.from_pretrained(a.ckpt, tasks=["text_to_image"], device=device, dtype=dtype,
                                              cuda_graphs=True)
    unet, vae = pipe.components.image_unet, pipe.components.vae
    g = torch.Generator().manual_seed(0)
    lat = a.size // 8
    x = torch.randn(2, unet.config.in_channels, lat, lat, generator=g).to(device, dtype)
    tokens = torch.randn(2, 77, pipe.components.text_unet.config.context_dim[0], generator=g).to(device, dtype)
    z = torch.randn(1, vae.config.latent_channels, lat, lat, generator=g) / vae.config.scaling_factor
    z = z.to(device, dtype)
    t = torch.tensor(981, device=device)
    streams = [Context(pipe.components.text_unet.context_layers(), tokens)]
    result = dict(device=device_name(device), versions=versions(), size=a.size, steps=a.steps,
                  cudnn_benchmark_limit=torch.backends.cudnn.benchmark_limit)

    # 1. kernels of an eager step (the fast path's layouts and autotuning, as the denoiser runs it)
    eager = NoisePredictor(unet)
    result["kernels"] = kernel_table(lambda: eager(x, t, streams), device, a.profile_calls)

    # 2. the graph step under variants
    reference = pipe.image_eps(x, t, streams)
    variants = {}

    def variant(name: str, make) -> None:
        try:
            step = make()
            start = time.perf_counter()
            out = step(x, t, streams)  # the capture (and compile) happen here
            sync(device)
            setup_s = time.perf_counter() - start
            variants[name] = dict(step_ms=median_ms(lambda: step(x, t, streams), device, a.repeats),
                                  rel_diff=rel(out, reference), setup_s=setup_s)
        except Exception as e:  # a backend this card or build lacks: say so and go on
            variants[name] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        print(name, json.dumps(variants[name]), flush=True)

    variant("default", lambda: pipe.image_eps)
    for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        def make(backend=getattr(SDPBackend, backend)):
            step = NoisePredictor(unet, cuda_graphs=True)
            others = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

            def run(*args):  # the capture happens in the first call: this backend first, the others as fallback
                with sdpa_kernel([backend, *others], set_priority=True):
                    return step(*args)
            return run
        variant(f"sdpa {backend.lower()} first", make)

    def cublaslt():  # cuBLASLt instead of cuBLAS for the matmuls captured in this graph
        step = NoisePredictor(unet, cuda_graphs=True)

        def run(*args):
            before = torch.backends.cuda.preferred_blas_library()
            torch.backends.cuda.preferred_blas_library("cublaslt")
            try:
                return step(*args)
            finally:
                torch.backends.cuda.preferred_blas_library(before)
        return run
    variant("blas cublaslt", cublaslt)

    # text_to_image runs the text UNet's context layers too
    plain_norms = channels_last_group_norms_(unet) + channels_last_group_norms_(pipe.components.text_unet)
    try:
        result["kernels_channels_last_group_norm"] = kernel_table(lambda: eager(x, t, streams), device,
                                                                  a.profile_calls)
        variant("group_norm channels-last", lambda: NoisePredictor(unet, cuda_graphs=True))
    finally:
        for parent, name, child in plain_norms:
            setattr(parent, name, child)
    if a.compile:
        def compiled():
            step = NoisePredictor(unet, cuda_graphs=True)
            step.compiled = torch.compile(unet, mode=None if a.compile == "default" else a.compile, dynamic=False)
            return step
        variant(f"compile {a.compile}", compiled)
    result["variants"] = variants

    # 3. the VAE decode
    decode = lambda: vae.decode(z)  # noqa: E731
    result["vae_decode_ms"] = dict(eager=median_ms(decode, device, max(5, a.repeats // 4)),
                                   graph=median_ms(graph_of(decode, device), device, max(5, a.repeats // 4)))
    # ... with the decoder channels-last and its GroupNorms kept so (the plain GroupNorm's copies made it slower)
    plain_image = decode()
    vae.to(memory_format=torch.channels_last)
    decoder_norms = channels_last_group_norms_(vae)
    try:
        decode_cl = lambda: vae.decode(z.to(memory_format=torch.channels_last))  # noqa: E731
        result["vae_decode_ms"]["channels_last_eager"] = median_ms(decode_cl, device, max(5, a.repeats // 4))
        result["vae_decode_ms"]["channels_last_rel_diff"] = rel(decode_cl(), plain_image)
    finally:
        for parent, name, child in decoder_norms:
            setattr(parent, name, child)
        vae.to(memory_format=torch.contiguous_format)

    # 4. one whole call with CUDA graphs
    def call():
        return pipe.text_to_image("a photograph of an astronaut riding a horse", height=a.size, width=a.size,
                                  num_inference_steps=a.steps, output_type="np", progress=False,
                                  generator=torch.Generator().manual_seed(0))
    e2e_ms = median_ms(call, device, max(2, a.repeats // 10), warmup=1)
    steps_ms = a.steps * variants["default"]["step_ms"]
    result["e2e_ms"] = dict(total=e2e_ms, unet_steps=steps_ms, vae_decode=result["vae_decode_ms"]["eager"],
                            rest=e2e_ms - steps_ms - result["vae_decode_ms"]["eager"])
    print(markdown(result))
    if a.markdown:
        a.markdown.write_text(markdown(result) + "\n")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return result


def kernel_lines(title: str, k: dict) -> list[str]:
    lines = [f"{title}: {k['total_ms']:.2f} ms", "", "| kind | ms per step | share | kernels per step |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {v['ms']:.3f} | {v['ms'] / k['total_ms']:.0%} | {v['count']:.0f} |"
              for name, v in k["kinds"].items()]
    lines += ["", "| top kernels | ms per step | calls |", "|---|---|---|"]
    return lines + [f"| `{t['name'][:100]}` | {t['ms']:.3f} | {t['count']:.0f} |" for t in k["top"]] + [""]


def markdown(r: dict) -> str:
    lines = [f"{r['device']}; {r['size']}x{r['size']}, {r['steps']} steps; torch {r['versions']['torch']}; "
             f"cudnn.benchmark_limit {r['cudnn_benchmark_limit']}", ""]
    lines += kernel_lines("Kernel time of one eager UNet step", r["kernels"])
    if "kernels_channels_last_group_norm" in r:
        lines += kernel_lines("... with channels_last_group_norm.py", r["kernels_channels_last_group_norm"])
    lines += ["| graph step variant | ms | relative diff to default | setup (s) |", "|---|---|---|---|"]
    for name, v in r["variants"].items():
        lines.append(f"| {name} | {v['error']} | | |" if "error" in v else
                     f"| {name} | {v['step_ms']:.2f} | {v['rel_diff']:.1e} | {v['setup_s']:.1f} |")
    d, e = r["vae_decode_ms"], r["e2e_ms"]
    lines += ["", f"VAE decode: eager {d['eager']:.2f} ms, CUDA graph {d['graph']:.2f} ms; channels-last with "
              f"ChannelsLastGroupNorm, eager {d['channels_last_eager']:.2f} ms (relative diff "
              f"{d['channels_last_rel_diff']:.1e})", "",
              f"one text_to_image call (CUDA graphs on a GPU): {e['total']:.1f} ms = UNet steps "
              f"{e['unet_steps']:.1f} + VAE decode {e['vae_decode']:.1f} + rest {e['rest']:.1f}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
