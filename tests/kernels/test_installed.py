"""use_triton_kernels_ on whole modules: a tiny image UNet with the text UNet's context layers (text-to-image)
and a tiny VAE decoder give the plain path's outputs with the kernels installed, run in Triton's CPU interpreter
(devices=("cpu",), which only the interpreter allows)."""

import os
import subprocess
import sys

import pytest
import torch
import triton  # noqa: F401  (no triton is a failure here, not a skip)

from helpers import REPO, TINY_UNET_A, TINY_VAE_A, flat_config, randomize_, rel_err
from vd.fast import speed_up_, use_triton_kernels_
from vd.kernels import runs_on
from vd.nn import AutoencoderKL, Context, UNet, UNetConfig, VAEConfig
from vd.nn.fusable import KernelHook
from vd.nn.layers import ResnetBlock

CPU = ("cpu",)


def _hooks(*modules):
    return [m for module in modules for m in module.modules() if isinstance(m, KernelHook)]


@torch.no_grad()
def test_unet_with_kernels(check):
    image = randomize_(UNet(UNetConfig.from_diffusers(TINY_UNET_A)).eval(), 0)
    text = randomize_(UNet(UNetConfig.from_diffusers(flat_config(TINY_UNET_A, [24, 1, 1])),
                           parts=frozenset({"context"})).eval(), 1)
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 16, generator=g)
    streams = [Context(text.context_layers(), ctx)]
    keys = image.state_dict().keys()
    speed_up_(image, text)  # channels-last, as on a GPU: the GroupNorm kernel reads NHWC memory
    x = x.to(memory_format=torch.channels_last)
    want = image(x, 500, streams)
    use_triton_kernels_(image, text, devices=CPU)
    hooks = _hooks(image, text)
    # 8 resnets x 2 GroupNorms and the output GroupNorm; 4 transformers in each UNet x (GroupNorm, 3 LayerNorms,
    # GEGLU)
    assert len(hooks) == 16 + 1 + 2 * 4 * 5 and all(h.kernel is not None for h in hooks)
    got = image(x, 500, streams)
    assert not torch.equal(got, want)  # the kernels ran (they round differently)...
    check(rel_err(got, want), 1e-5)  # ...to the same result
    assert image.state_dict().keys() == keys
    use_triton_kernels_(image, text, devices=())  # off again: the plain path exactly
    assert torch.equal(image(x, 500, streams), want)


@torch.no_grad()
def test_vae_decoder_with_kernels(check):
    vae = randomize_(AutoencoderKL(VAEConfig.from_diffusers(TINY_VAE_A), parts=frozenset({"decoder"})).eval(), 3)
    z = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(4))
    want = vae.decode(z)
    use_triton_kernels_(vae.decoder, None, devices=CPU)  # NCHW, as the pipeline runs the VAE
    assert len(_hooks(vae)) == 14  # 6 resnets x 2, the mid attention's and the output's GroupNorm
    got = vae.decode(z)
    assert not torch.equal(got, want)
    check(rel_err(got, want), 1e-5)


def test_devices_are_checked():
    unet = UNet(UNetConfig.from_diffusers(TINY_UNET_A), parts=frozenset({"context"}))
    with pytest.raises(TypeError, match="devices must be a sequence of device types"):
        use_triton_kernels_(unet, devices="cuda")
    with pytest.raises(ValueError, match="devices must be device types among 'cuda' and 'cpu'"):
        use_triton_kernels_(unet, devices=("mps",))
    assert all(h.kernel is None for h in _hooks(unet))


def test_triton_only_when_asked():
    """Without the interpreter (a fresh process): importing vd, its networks, fast path and pipeline imports no
    triton, and the kernels refuse CPU tensors, where they could not run."""
    code = ("import sys\nimport torch\nimport vd, vd.fast, vd.kernels, vd.nn, vd.pipeline\n"
            "assert 'triton' not in sys.modules\nassert vd.kernels.available()\n"
            "vd.fast.use_triton_kernels_(torch.nn.Module(), devices=('cpu',))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert p.returncode == 1 and "ValueError: devices may include 'cpu' only under Triton's interpreter" in p.stderr, \
        p.stderr[-2000:]


@torch.no_grad()
def test_torch_compile_runs_the_kernels_outside_its_graph(check):
    """torch.compile over layers with the kernels installed: it breaks its graph around them and runs them as
    they are (their launchers are torch.compiler.disable'd), with the same result."""
    block = randomize_(ResnetBlock(16, 24, 8, 4, 1e-5), 5).eval()
    g = torch.Generator().manual_seed(6)
    x, temb = torch.randn(2, 16, 5, 5, generator=g), torch.randn(2, 8, generator=g)
    want = block(x, temb)
    use_triton_kernels_(block, devices=CPU)
    check(rel_err(torch.compile(block, backend="aot_eager")(x, temb), want), 1e-5)


def test_runs_on_says_whether_a_kernel_builds_and_runs(monkeypatch):
    runs_on.cache_clear()
    assert runs_on(torch.device("cpu"))  # the interpreter runs it
    runs_on.cache_clear()

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler for this device")
    monkeypatch.setattr("vd.kernels.group_norm.group_norm", broken)
    assert not runs_on(torch.device("cpu"))
    runs_on.cache_clear()
