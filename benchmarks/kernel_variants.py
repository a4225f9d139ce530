"""The Triton kernel variants the CUDA fast path compiles on a machine's first run, found and compiled for an
H100 without a GPU.

Triton compiles a kernel once per specialisation (its constexprs, which integer arguments are 1 or divisible by
16, which pointers are 16-byte aligned, its launch options) on first use, and caches the binary on disk. This
script runs the full-size networks (fp16, channels-last UNets, as `from_pretrained` sets them up on CUDA) on the
meta device with every kernel launch handed to Triton's own argument binder instead of run, so the variants are
those a GPU run would compile; then it compiles each for sm_90 in an empty cache, as a launch that misses the
cache does, and times it. One difference from CUDA is mended: on meta a convolution returns NCHW, where cuDNN
returns channels-last for channels-last weights.

    python benchmarks/kernel_variants.py [--size 512] [--images 1] [--stages ...] [--no-compile] [--json OUT]

Stages, in the order a session meets them: the start-up probe (`vd.kernels.runs_on`), each flow's guided UNet
step (and the VAE decode for the image flows), then `encode`, the VAE encoder an init image adds. A stage
counts only the variants that no earlier stage compiled.
"""

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vd.fast import speed_up_, use_triton_kernels_  # noqa: E402
from vd.nn import VD_IMAGE_UNET, VD_TEXT_UNET, VD_VAE, AutoencoderKL, Context, UNet  # noqa: E402

H100 = ("cuda", 90, 32)  # Triton's GPUTarget: backend, compute capability, warp size
KERNELS = (("vd.kernels.group_norm", "_chunk_moments"), ("vd.kernels.group_norm", "_normalize"),
           ("vd.kernels.geglu", "_geglu"), ("vd.kernels.layer_norm", "_add_layer_norm"))
STAGES = ("probe", "text_to_image", "image_variation", "dual_guided", "image_to_text", "text_variation", "encode")


def launch_kwargs(kernel, kwargs: dict) -> dict:
    """A launch's keyword arguments with the options `JITFunction.run` adds before it binds them (Triton 3.9 adds
    two compilation knobs to 3.5's debug flag)."""
    from triton import knobs
    added = {"debug": kwargs.get("debug", kernel.debug) or knobs.runtime.debug}
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            added[name] = getattr(knobs.compilation, name)
    return {**kwargs, **added}


class Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` binds the arguments as Triton's launcher does
    and keeps one record per cache key, for the stage running (`now["stage"]`), without running anything."""

    def __init__(self, kernel, backend, seen: dict, now: dict):
        from triton.runtime.jit import compute_cache_key, create_function_from_signature
        self.kernel, self.seen, self.now, self.cache_key = kernel, seen, now, compute_cache_key
        self.binder = create_function_from_signature(kernel.signature, kernel.params, backend)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            kwargs = launch_kwargs(self.kernel, kwargs)
            bound, specialization, options = self.binder(*args, **kwargs)
            key = (self.kernel.fn.__name__, self.cache_key({}, specialization, options))
            self.seen.setdefault(key, dict(kernel=self.kernel, bound=bound, specialization=specialization,
                                           kwargs=kwargs, stage=self.now["stage"]))
        return launch


class CudnnLayouts(TorchFunctionMode):
    """cuDNN's rule for a convolution's output, on meta tensors: channels-last if its input or weight is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.conv2d and out.dim() == 4 and any(
                t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
                for t in args[:2]):
            out = out.contiguous(memory_format=torch.channels_last)
        return out


def record(size: int, images: int, stages: tuple[str, ...] = STAGES) -> dict:
    """Every kernel variant the stages launch, in first-launch order: {(kernel name, cache key): record}."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget(*H100))
    seen, now = {}, {"stage": None}
    for module, name in KERNELS:
        mod = importlib.import_module(module)
        setattr(mod, name, Recorder(getattr(mod, name), backend, seen, now))
    from vd.kernels.group_norm import group_norm

    h, meta = torch.float16, dict(device="meta", dtype=torch.float16)
    with torch.device("meta"):
        image_unet, text_unet, vae = UNet(VD_IMAGE_UNET).to(h), UNet(VD_TEXT_UNET).to(h), AutoencoderKL(VD_VAE).to(h)
    speed_up_(image_unet, text_unet)
    use_triton_kernels_(image_unet, text_unet, vae)
    for m in (image_unet, text_unet, vae):  # the hooks fire for meta inputs instead of CUDA ones
        for sub in m.modules():
            if getattr(sub, "kernel", None) is not None:
                sub.kernel_devices = ("meta",)

    n, latent = 2 * images, size // 8  # the UNet sees [uncond; cond]
    text, pictures = torch.empty(n, 77, 768, **meta), torch.empty(n, 257, 768, **meta)
    text_context, image_context = text_unet.context_layers(), image_unet.context_layers()
    t = torch.full((n,), 981.0, device="meta")

    def image_step(*streams):
        image_unet(torch.empty(n, 4, latent, latent, **meta), t, [c.with_keys_values() for c in streams])
        vae.decode(torch.empty(images, 4, latent, latent, **meta))

    def text_step(stream):
        text_unet(torch.empty(n, 768, 1, 1, **meta), t, [stream.with_keys_values()],
                  time_embedding=image_unet.time_embedding)

    run = {
        "probe": lambda: group_norm(*(torch.empty(s, device="meta") for s in ((1, 32, 4, 4), (32,), (32,))), 8, 1e-5),
        "text_to_image": lambda: image_step(Context(text_context, text)),
        "image_variation": lambda: image_step(Context(image_context, pictures)),
        "dual_guided": lambda: image_step(Context(text_context, text, 0.5), Context(image_context, pictures, 0.5)),
        "image_to_text": lambda: text_step(Context(image_context, pictures)),
        "text_variation": lambda: text_step(Context(text_context, text)),
        "encode": lambda: vae.encode(torch.empty(images, 3, size, size, **meta)),
    }
    with torch.no_grad(), CudnnLayouts():
        for name in STAGES:
            if name in stages:
                now["stage"] = name
                run[name]()
    return seen


def compile_all(seen: dict) -> list[float]:
    """Compile every recorded variant for an H100 as a launch that misses the cache does; seconds each."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    target = GPUTarget(*H100)
    backend = make_backend(target)
    seconds = []
    for r in seen.values():
        kernel = r["kernel"]
        options, signature, constexprs, attrs = kernel._pack_args(backend, r["kwargs"], r["bound"],
                                                                  r["specialization"], None)
        t0 = time.perf_counter()
        triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
        seconds.append(time.perf_counter() - t0)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="image height and width in pixels (default 512)")
    ap.add_argument("--images", type=int, default=1, help="images per call (the UNet sees twice as many)")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="default: all")
    ap.add_argument("--no-compile", action="store_true", help="count the variants only")
    ap.add_argument("--json", type=Path, help="write the result here too")
    a = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("kernel_variants.py: unset TRITON_INTERPRET (the interpreter has no compiler to time)")

    seen = record(a.size, a.images, tuple(a.stages))
    stages = [s for s in STAGES if s in a.stages]
    result = dict(size=a.size, images=a.images, variants=len(seen),
                  new_per_stage={s: sum(r["stage"] == s for r in seen.values()) for s in stages},
                  per_kernel=dict(Counter(name for name, _ in seen)))
    if not a.no_compile:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["TRITON_CACHE_DIR"] = cache  # empty: every variant compiles, as on a machine's first run
            seconds = compile_all(seen)
        by_stage = {s: round(sum(x for x, r in zip(seconds, seen.values()) if r["stage"] == s), 2) for s in stages}
        result.update(compile_s=round(sum(seconds), 2), compile_s_per_stage=by_stage,
                      compile_s_slowest=round(max(seconds, default=0.0), 3), cpus=os.cpu_count())
    print(json.dumps(result))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
