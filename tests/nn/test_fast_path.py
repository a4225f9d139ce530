"""The GPU fast path's pieces that also run on the CPU give the plain path's results."""

import copy
from types import SimpleNamespace

import pytest
import torch

from helpers import TINY_UNET_A, flat_config, randomize_, rel_err
import vd.fast
from vd.fast import NoisePredictor, _cloned, _Graph, cudnn_autotuning, fast_path, speed_up_
from vd.nn import Context, UNet, UNetConfig


def _unets():
    cfg = UNetConfig.from_diffusers(TINY_UNET_A)
    image = UNet(cfg).eval()
    text = UNet(UNetConfig.from_diffusers(flat_config(TINY_UNET_A, [24, 1, 1])), parts=frozenset({"context"})).eval()
    for i, m in enumerate((image, text)):
        randomize_(m, i)
    return image, text


@torch.no_grad()
def test_channels_last_and_fused_projections_keep_the_math(check):
    image, text = _unets()
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 16)
    streams = [Context(text.context_layers(), ctx, 0.3), Context(image.context_layers(), ctx[:, :5], 0.7)]
    want = image(x, 500, streams)
    state = {k: v.clone() for k, v in image.state_dict().items()}
    speed_up_(image, text)
    assert image.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    attn1 = image.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attn1.qkv_weight is not None  # and q, k, v are views into it: no memory added
    assert attn1.to_v.weight.untyped_storage().data_ptr() == attn1.qkv_weight.untyped_storage().data_ptr()
    assert text.context_layers()[0].transformer_blocks[0].attn2.kv_weight is not None
    got = image(x.to(memory_format=torch.channels_last), 500, streams)
    check(rel_err(got, want), 1e-5)  # fp32: other kernels, other rounding
    # the stacked copies are not part of the checkpoint
    assert image.state_dict().keys() == state.keys()


@torch.no_grad()
def test_fused_projections_stay_stacked_through_a_cast(check):
    """A cast or a move (nn.Module's same path) of a sped-up UNet keeps q, k, v views into one stacked weight,
    and the math of the same UNet cast without the fast path; share_memory keeps them in shared memory."""
    x, ctx = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 77, 16, dtype=torch.float64)

    def run(image, text):
        streams = [Context(text.context_layers(), ctx, 0.3), Context(image.context_layers(), ctx[:, :5], 0.7)]
        return image(x, 500, streams)
    image, text = _unets()
    want = run(*(copy.deepcopy(m).double() for m in (image, text)))
    speed_up_(image, text)
    attn1 = image.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    attn2 = text.context_layers()[0].transformer_blocks[0].attn2
    image.share_memory()  # in place: the stacked weight itself is shared, and stays the projections' storage
    assert attn1.qkv_weight.is_shared() and attn1.to_q.weight.is_shared()
    image.double(), text.double()
    assert attn1.qkv_weight.dtype == torch.float64 and attn2.kv_weight.dtype == torch.float64
    for a, stacked in ((attn1, attn1.qkv_weight), (attn2, attn2.kv_weight)):
        for p in (a.to_k, a.to_v) if a is attn2 else (a.to_q, a.to_k, a.to_v):
            assert p.weight.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
    check(rel_err(run(image, text), want), 1e-12)  # float64: only the summation order differs


@torch.no_grad()
def test_denoiser_plain_and_compiled(check):
    image, text = _unets()
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 16)
    streams = [Context(text.context_layers(), ctx)]
    want = image(x, torch.tensor(321), streams)
    assert torch.equal(NoisePredictor(image)(x, torch.tensor(321), streams), want)
    # torch.compile's graph capture and guards, without paying for code generation in the test suite
    compiled = NoisePredictor(image)
    compiled.compiled = torch.compile(image, backend="aot_eager", dynamic=False)
    check(rel_err(compiled(x, torch.tensor(321), streams), want), 1e-5)


@torch.no_grad()
def test_denoiser_with_another_unets_time_embedding():
    """The text flows run the text UNet's data layers with the image UNet's time MLP."""
    image, text = _unets()
    other = randomize_(UNet(image.config, parts=frozenset({"global"})), 7).time_embedding
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 16)
    streams = [Context(text.context_layers(), ctx)]
    want = image(x, torch.tensor(321), streams, time_embedding=other)
    assert not torch.equal(want, image(x, torch.tensor(321), streams))
    assert torch.equal(NoisePredictor(image, time_embedding=other)(x, torch.tensor(321), streams), want)


def test_cuda_graphs_are_ignored_on_cpu():
    image, text = _unets()
    d = NoisePredictor(image, cuda_graphs=True)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 16)
    with torch.no_grad():
        assert torch.equal(d(x, torch.tensor(5), [Context(text.context_layers(), ctx)]),
                           image(x, torch.tensor(5), [Context(text.context_layers(), ctx)]))
    assert not d.graphs


@pytest.mark.parametrize("before", [False, True])
def test_denoiser_leaves_cudnn_autotuning_as_it_found_it(before):
    """The denoiser turns cuDNN autotuning on for CUDA inputs only while it runs; the user's setting survives."""
    image, text = _unets()
    torch.backends.cudnn.benchmark = before
    try:
        with torch.no_grad():
            NoisePredictor(image)(torch.randn(1, 4, 8, 8), torch.tensor(5), [Context(text.context_layers(),
                                                                             torch.randn(1, 77, 16))])
        assert torch.backends.cudnn.benchmark is before
    finally:
        torch.backends.cudnn.benchmark = False


def test_no_cudnn_autotuning_where_determinism_is_asked(monkeypatch):
    """Autotuning may pick another convolution algorithm, which rounds otherwise, in another process: the
    denoiser turns it on for CUDA inputs unless the user asked for deterministic algorithms, either way."""
    cuda = SimpleNamespace(is_cuda=True)  # (a CUDA tensor as this function sees one)
    assert cudnn_autotuning(cuda) and not cudnn_autotuning(torch.zeros(1))
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    assert not cudnn_autotuning(cuda)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not cudnn_autotuning(cuda)
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    # and the denoiser asks it: autotuning is on while the UNet runs exactly when it says so
    image, text = _unets()
    seen = []
    monkeypatch.setattr(NoisePredictor, "forward", lambda self, x, t, s: seen.append(torch.backends.cudnn.benchmark))
    for answer in (True, False):
        monkeypatch.setattr(vd.fast, "cudnn_autotuning", lambda x: answer)
        NoisePredictor(image)(torch.randn(1, 4, 8, 8), torch.tensor(5), [Context(text.context_layers(),
                                                                         torch.randn(1, 77, 16))])
    assert seen == [True, False] and torch.backends.cudnn.benchmark is False


class _FakeGraph:
    """Stands in for a CUDA graph on the CPU: a replay recomputes the step from the captured static tensors."""

    def __init__(self, replay):
        self.replay = replay


class _CpuGraphs(NoisePredictor):
    """The graph bookkeeping (static inputs, what is copied in when, the LRU bound) with _FakeGraph captures."""

    graph_device = "cpu"

    def _capture(self, x, t, streams):
        g = _Graph(None, x.clone(), torch.as_tensor(t).clone(), [_cloned(c) for c in streams], None)
        g.out = self.forward(g.x, g.t, g.streams)
        g.graph = _FakeGraph(lambda: g.out.copy_(self.forward(g.x, g.t, g.streams)))
        return g


@pytest.mark.parametrize("keys_values", [False, True])
@torch.no_grad()
def test_graph_replays_see_new_inputs(keys_values):
    """Every replay computes what an eager call computes: new x and t each step; new tokens (or keys and values)
    when a call brings new ones, and when the same tensors were changed in place."""
    image, text = _unets()
    pred = _CpuGraphs(image, cuda_graphs=True)

    def streams(seed):
        c = Context(text.context_layers(), torch.randn(2, 77, 16, generator=torch.Generator().manual_seed(seed)))
        return [c.with_keys_values() if keys_values else c]

    first, second = streams(1), streams(2)
    for s in (first, first, second, first):
        x, t = torch.randn(2, 4, 8, 8), torch.tensor(float(torch.randint(1000, ())))
        assert torch.equal(pred(x, t, s), image(x, t, s))
    first[0].tokens.mul_(2)  # in place: the same tensor, a new version
    if keys_values:
        first[0].keys_values[0][0][1][0].mul_(2)
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(pred(x, 9, first), image(x, 9, first))
    assert len(pred.graphs) == 1


@torch.no_grad()
def test_graphs_are_bounded_least_recently_used_first():
    image, text = _unets()
    pred = _CpuGraphs(image, cuda_graphs=True, max_graphs=2)
    ctx = [Context(text.context_layers(), torch.randn(1, 77, 16))]
    for size in (8, 16, 8, 24):  # 16 is the least recently used when 24 comes
        pred(torch.randn(1, 4, size, size), 5, ctx)
    assert [key[0] for key in pred.graphs] == [(1, 4, 8, 8), (1, 4, 24, 24)]
    pred.clear()
    assert not pred.graphs


def test_graphs_step_aside_for_autograd():
    image, text = _unets()
    pred = _CpuGraphs(image.requires_grad_(False), cuda_graphs=True)
    tokens = torch.randn(1, 77, 16, requires_grad=True)
    out = pred(torch.randn(1, 4, 8, 8), 5, [Context(text.context_layers(), tokens)])
    assert out.grad_fn is not None and not pred.graphs
    pred(torch.randn(1, 4, 8, 8), 5, [Context(text.context_layers(), tokens.detach())])  # nothing needs grad
    assert len(pred.graphs) == 1


CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # fast_path only reads the device's type: no GPU needed


def test_fast_path_is_on_by_default_for_cuda_only(monkeypatch):
    monkeypatch.setattr("vd.fast.kernels_run_on", lambda device: True)  # as on a GPU machine
    assert fast_path(CPU, False, None, None) == (False, False)
    assert fast_path(CUDA, False, None, None) == (True, True)  # triton comes with the test extra
    assert fast_path(CUDA, True, None, None) == (True, False)  # torch.compile fuses by itself
    assert fast_path(CUDA, True, None, True) == (True, True)
    assert fast_path(CUDA, False, False, False) == (False, False)
    assert fast_path(CPU, False, True, True) == (False, False)  # both are CUDA-only


def test_fast_path_refuses_kernels_without_triton(monkeypatch):
    monkeypatch.setattr("vd.fast.kernels_available", lambda: False)
    assert fast_path(CUDA, False, None, None) == (True, False)
    with pytest.raises(ValueError, match="triton_kernels: True needs the triton package"):
        fast_path(CUDA, False, None, True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the real check on a machine without a GPU")
def test_the_kernel_check_fails_without_a_gpu():
    from vd.kernels import runs_on
    assert runs_on(CUDA) is False


def test_kernels_stay_off_by_default_where_triton_cannot_build_them(monkeypatch):
    """Where the one-time check fails (no GPU, no compiler for it), the default turns the kernels off with a
    warning; asking for them is not second-guessed."""
    monkeypatch.setattr("vd.fast.kernels_run_on", lambda device: False)
    with pytest.warns(UserWarning, match="Triton cannot build its kernels for cuda here"):
        assert fast_path(CUDA, False, None, None) == (True, False)
    monkeypatch.setattr("vd.fast.kernels_run_on", lambda device: pytest.fail("checked though asked for"))
    assert fast_path(CUDA, False, None, True) == (True, True)
