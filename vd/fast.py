"""The GPU fast path: channels-last convolutions, stacked attention projections, cuDNN autotuning, and a
noise predictor (the UNet step) that can be compiled with torch.compile and replayed from CUDA graphs.

Measured on an H100 (fp16, 512x512, text_to_image; benchmarks/step_variants.py, benchmarks/RESULTS.md):
channels-last makes the UNet step 16% faster (12.1 -> 10.2 ms from a CUDA graph) but the VAE decode 27% slower
(23.1 -> 29.2 ms), so only the UNets take it; cuDNN autotuning leaves the kernels' time alone but spares the CPU
a heuristic query per convolution, which makes the eager step 27% faster (33.8 -> 24.7 ms).

`use_triton_kernels_` swaps the memory-bound tail for fused Triton kernels (vd/kernels): GroupNorm with the
time-embedding add and the SiLU, read in the activation's own memory format (no layout copies), GEGLU in one pass,
and each residual add with the LayerNorm after it.

None of this changes the math; outputs equal the plain path within the dtype's rounding. Attention already goes
through scaled_dot_product_attention, which picks its kernel by itself: cuDNN's fused attention on an H100 with
torch 2.11 (preferring flash or memory-efficient attention made the step 7-25% slower). What the remaining step
time is spent on, and what else was tried without gain: benchmarks/RESULTS.md, runs 4-6.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vd.nn import Context, UNet
from vd.nn.fusable import GroupNorm, LayerNorm
from vd.nn.layers import GEGLU, Attention, TimestepEmbedding


def speed_up_(*modules: nn.Module | None) -> None:
    """Channels-last weights for the convolutions and stacked q|k|v / k|v projections, in place."""
    for m in modules:
        if m is None:
            continue
        m.to(memory_format=torch.channels_last)
        for sub in m.modules():
            if isinstance(sub, Attention):
                sub.fuse_projections()


def use_triton_kernels_(*modules: nn.Module | None, devices: Sequence[str] = ("cuda",)) -> None:
    """Run the fused Triton kernels of vd.kernels, in place of the plain math, in every GroupNorm, residual add +
    LayerNorm and GEGLU of the modules, for inputs on the device types `devices`; `devices=()` turns them off.

    "cpu" is accepted only when the kernels run in Triton's interpreter (TRITON_INTERPRET=1 before triton is
    imported), which is how the tests check them without a GPU. fp16, bf16 and fp32 only (the kernels refuse
    other dtypes). Outputs equal the plain path's within the dtype's rounding; state_dict is unchanged.
    """
    if isinstance(devices, str) or not all(isinstance(d, str) for d in devices):
        raise TypeError(f"devices must be a sequence of device types such as ('cuda',), got {devices!r}")
    if not set(devices) <= {"cuda", "cpu"}:
        raise ValueError(f"devices must be device types among 'cuda' and 'cpu', got {devices!r}")
    from vd import kernels
    if not kernels.available():
        raise RuntimeError("use_triton_kernels_ needs triton, which is not installed (pip install triton)")
    if "cpu" in devices and not kernels.interpreted():
        raise ValueError("devices may include 'cpu' only under Triton's interpreter: set TRITON_INTERPRET=1 before "
                         "triton is imported")
    from vd.kernels.geglu import geglu
    from vd.kernels.group_norm import group_norm
    from vd.kernels.layer_norm import add_layer_norm
    for m in modules:
        for sub in m.modules() if m is not None else ():
            if isinstance(sub, GroupNorm) and sub.affine:
                sub.install_kernel(group_norm, devices)
            elif isinstance(sub, LayerNorm) and sub.weight is not None and sub.bias is not None \
                    and len(sub.normalized_shape) == 1:
                sub.install_kernel(add_layer_norm, devices)
            elif isinstance(sub, GEGLU):
                sub.install_kernel(geglu, devices)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: Tensor
    t: Tensor
    tokens: list[Tensor]
    out: Tensor


class NoisePredictor:
    """The noise prediction eps = unet(x, t, streams) of one UNet's data layers, as the samplers call it (not a
    k-diffusion "denoiser", which returns x0), optionally through torch.compile and CUDA graphs.

    A CUDA graph is captured per input shape and stream layout (which context layers, token shapes, weights),
    on first use; later calls copy their inputs into the graph's static tensors and replay it. Compile and
    capture times are kept in `setup_seconds` so benchmarks can report them apart from steady-state time.
    """

    def __init__(self, unet: UNet, *, time_embedding: TimestepEmbedding | None = None, compile: bool = False,
                 cuda_graphs: bool = False):
        self.unet, self.time_embedding = unet, time_embedding  # time_embedding: another UNet's (text flows)
        self.dtype = next(unet.parameters()).dtype
        self.compiled = torch.compile(unet, dynamic=False) if compile else unet
        self.cuda_graphs = cuda_graphs
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = None
        self.setup_seconds = 0.0

    def __call__(self, x: Tensor, t: Tensor, streams: Sequence[Context]) -> Tensor:
        # The UNet runs in its weights' dtype, as the reference does: under autocast, every GroupNorm and
        # LayerNorm would round-trip through float32 (their CUDA kernels accumulate in float32 anyway).
        x = x.to(self.dtype)
        streams = [c if c.tokens.dtype == self.dtype else Context(c.layers, c.tokens.to(self.dtype), c.weight)
                   for c in streams]
        autotune = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = x.is_cuda or autotune  # shapes are fixed for a whole run
        try:
            with torch.autocast(x.device.type, enabled=False):
                return self._call(x, t, streams)
        finally:
            torch.backends.cudnn.benchmark = autotune

    def forward(self, x: Tensor, t: Tensor, streams: Sequence[Context]) -> Tensor:
        if self.time_embedding is None:
            return self.compiled(x, t, streams)
        return self.compiled(x, t, streams, time_embedding=self.time_embedding)

    def _call(self, x: Tensor, t: Tensor, streams: Sequence[Context]) -> Tensor:
        if not (self.cuda_graphs and x.is_cuda):
            return self.forward(x, t, streams)
        key = (tuple(x.shape), x.dtype,
               tuple((id(c.layers[0]), tuple(c.tokens.shape), c.tokens.dtype, c.weight) for c in streams))
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture(x, t, streams)
        g.x.copy_(x)
        g.t.copy_(torch.as_tensor(t, device=x.device))
        for static, c in zip(g.tokens, streams):
            static.copy_(c.tokens)
        g.graph.replay()
        return g.out.clone()

    def _capture(self, x: Tensor, t: Tensor, streams: Sequence[Context]) -> _Graph:
        start = time.perf_counter()
        sx, st = x.clone(), torch.as_tensor(t, device=x.device).clone()
        tokens = [c.tokens.clone() for c in streams]
        static = [Context(c.layers, tok, c.weight) for c, tok in zip(streams, tokens)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (and compile) outside the capture
            for _ in range(2):
                self.forward(sx, st, static)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.forward(sx, st, static)
        torch.cuda.synchronize()
        self.setup_seconds += time.perf_counter() - start
        return _Graph(graph, sx, st, tokens, out)
