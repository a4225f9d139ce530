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
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from vd.kernels import available as kernels_available
from vd.kernels import runs_on as kernels_run_on
from vd.nn import Context, UNet
from vd.nn.fusable import GroupNorm, LayerNorm
from vd.nn.layers import GEGLU, Attention, TimestepEmbedding


EAGER = {"cuda_graphs": False, "triton_kernels": False}  # from_pretrained's options for the plain path on CUDA


def fast_path(device: torch.device, compile: bool, cuda_graphs: bool | None,
              triton_kernels: bool | None) -> tuple[bool, bool]:
    """Whether to replay CUDA graphs and run the Triton kernels: None means on for CUDA (the kernels also need
    triton able to build for that device, checked once, and stay off under torch.compile, which fuses by
    itself). Asking for the kernels without triton is an error; asking for either on another device does
    nothing, as both are CUDA-only."""
    for name, value in (("cuda_graphs", cuda_graphs), ("triton_kernels", triton_kernels)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name}: expected True, False or None, got {value!r}")
    cuda = device.type == "cuda"
    if triton_kernels and not kernels_available():
        raise ValueError("triton_kernels: True needs the triton package, which is not importable here")
    graphs = cuda if cuda_graphs is None else cuda_graphs and cuda
    if triton_kernels is None:
        triton_kernels = cuda and not compile and kernels_available()
        if triton_kernels and not kernels_run_on(device):
            warnings.warn(f"vd: Triton cannot build its kernels for {device} here, so they stay off (the plain "
                          "PyTorch path, a little slower); pass triton_kernels=True to see the error", stacklevel=3)
            triton_kernels = False
    return graphs, cuda and triton_kernels


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
    streams: list[Context]  # the static copies the graph reads
    out: Tensor
    sources: list[tuple[Tensor, int]] = field(default_factory=list)  # streams' tensors last copied in, and versions


def cudnn_autotuning(x: Tensor) -> bool:
    """Whether the denoiser turns cuDNN autotuning on for `x`: on CUDA, unless the user asked for deterministic
    algorithms (`torch.use_deterministic_algorithms(True)` or `torch.backends.cudnn.deterministic = True`), since
    autotuning times the algorithms and may pick another one, rounding otherwise, in another process."""
    asked = torch.are_deterministic_algorithms_enabled() or torch.backends.cudnn.deterministic
    return x.is_cuda and not asked


def _stream_tensors(streams: Sequence[Context]) -> list[Tensor]:
    """Every tensor the streams bring into a step: tokens, and keys and values where computed, in a fixed order."""
    return [a for c in streams
            for a in [c.tokens, *(t for layer in c.keys_values or () for block in layer
                                  for pair in block if pair is not None for t in pair)]]


def _cloned(c: Context) -> Context:
    kv = None if c.keys_values is None else [
        [tuple(None if pair is None else (pair[0].clone(), pair[1].clone()) for pair in block) for block in layer]
        for layer in c.keys_values]
    return replace(c, tokens=c.tokens.clone(), keys_values=kv)


class NoisePredictor:
    """The noise prediction eps = unet(x, t, streams) of one UNet's data layers, as the samplers call it (not a
    k-diffusion "denoiser", which returns x0), optionally through torch.compile and CUDA graphs.

    A CUDA graph is captured per input shape and stream layout (which context layers, token shapes, weights) on
    first use, and at most `max_graphs` are kept (least recently used first out: each holds its output and
    shares one memory pool of activations with the others). Later calls copy x and t into the graph's static
    tensors, and the streams' tokens, keys and values only when they are not the ones copied last (a sampling
    loop passes the same ones at every step), then replay it. Graphs are used only when autograd is not needed
    (no_grad or inference mode, or nothing requires grad): a replay has no backward. Compile and capture times
    are kept in `setup_seconds` so benchmarks can report them apart from steady-state time.
    """

    graph_device = "cuda"  # where graphs are captured (tests replace the capture to check the bookkeeping)

    def __init__(self, unet: UNet, *, time_embedding: TimestepEmbedding | None = None, compile: bool = False,
                 cuda_graphs: bool = False, max_graphs: int = 8):
        self.unet, self.time_embedding = unet, time_embedding  # time_embedding: another UNet's (text flows)
        self.dtype = next(unet.parameters()).dtype
        self.compiled = torch.compile(unet, dynamic=False) if compile else unet
        self.cuda_graphs, self.max_graphs = cuda_graphs, max_graphs
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.pool = None
        self.setup_seconds = 0.0

    def __call__(self, x: Tensor, t: Tensor, streams: Sequence[Context]) -> Tensor:
        # The UNet runs in its weights' dtype, as the reference does: under autocast, every GroupNorm and
        # LayerNorm would round-trip through float32 (their CUDA kernels accumulate in float32 anyway).
        x = x.to(self.dtype)
        streams = [c if c.tokens.dtype == self.dtype else replace(c, tokens=c.tokens.to(self.dtype)) for c in streams]
        autotune = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = autotune or cudnn_autotuning(x)  # shapes are fixed for a whole run
        try:
            with torch.autocast(x.device.type, enabled=False):
                if self.cuda_graphs and x.device.type == self.graph_device and not self._needs_grad(x, streams):
                    return self._replay(x, t, streams)
                return self.forward(x, t, streams)
        finally:
            torch.backends.cudnn.benchmark = autotune

    def forward(self, x: Tensor, t: Tensor, streams: Sequence[Context]) -> Tensor:
        if self.time_embedding is None:
            return self.compiled(x, t, streams)
        return self.compiled(x, t, streams, time_embedding=self.time_embedding)

    def clear(self) -> None:
        """Drop the captured graphs (their memory returns to torch's caching allocator)."""
        self.graphs.clear()
        self.pool = None

    def _needs_grad(self, x: Tensor, streams: Sequence[Context]) -> bool:
        if not torch.is_grad_enabled():
            return False
        return (x.requires_grad or any(a.requires_grad for a in _stream_tensors(streams))
                or any(p.requires_grad for p in self.unet.parameters()))

    def _replay(self, x: Tensor, t: Tensor, streams: Sequence[Context]) -> Tensor:
        key = (tuple(x.shape), x.dtype, tuple((id(c.layers[0]), tuple(c.tokens.shape), c.tokens.dtype, c.weight,
                                               c.keys_values is not None) for c in streams))
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture(x, t, streams)
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        g.x.copy_(x)
        g.t.copy_(torch.as_tensor(t, device=x.device))
        given = _stream_tensors(streams)
        if len(given) != len(g.sources) or any(a is not b or a._version != v for a, (b, v) in zip(given, g.sources)):
            for static, a in zip(_stream_tensors(g.streams), given):
                static.copy_(a)
            g.sources = [(a, a._version) for a in given]
        g.graph.replay()
        return g.out.clone()

    def _capture(self, x: Tensor, t: Tensor, streams: Sequence[Context]) -> _Graph:
        start = time.perf_counter()
        sx, st = x.clone(), torch.as_tensor(t, device=x.device).clone()
        static = [_cloned(c) for c in streams]
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
        return _Graph(graph, sx, st, static, out)
