"""`vd` and `weights_convert` never import diffusers: every module and sampler is built and run in a fresh
interpreter, which then checks sys.modules."""

import subprocess
import sys
import textwrap


def test_runtime_does_not_import_diffusers():
    code = textwrap.dedent('''
        import sys
        import torch
        import vd, weights_convert
        from vd.nn import AutoencoderKL, Context, UNet, UNetConfig, VAEConfig
        from vd.sched import SCHEDULERS, sampler_from_config
        from vd.fast import NoisePredictor
        from vd.pipeline import VersatileDiffusion
        image = UNetConfig(in_channels=4, out_channels=4, block_channels=(8, 16), down_attention=(True, False),
                           up_attention=(False, True), layers_per_block=(1, 1), num_heads=(2, 2),
                           context_dim=(8, 8), transformer_depth=(1, 1), only_cross_attention=(False, False),
                           norm_groups=4)
        text = UNetConfig(**{**vars(image), "in_channels": (6, 1, 1), "out_channels": (6, 1, 1), "flat_dim": 4})
        img, txt = UNet(image), UNet(text)
        ctx = torch.randn(1, 5, 8)
        with torch.no_grad():
            x = NoisePredictor(img)(torch.randn(1, 4, 8, 8), torch.tensor(10), [Context(txt.context_layers(), ctx)])
            y = txt(torch.randn(1, 6, 1, 1), 10, [Context(img.context_layers(), ctx)], img.time_embedding)
            vae = AutoencoderKL(VAEConfig(block_channels=(8, 8), layers_per_block=1, norm_groups=4))
            z = vae.decode(vae.encode(torch.rand(1, 3, 16, 16) * 2 - 1).mean)
            config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
            for name in SCHEDULERS:
                s = sampler_from_config(name, config).sample(lambda x, t: 0.1 * x, torch.randn(1, 4), 4)
        assert x.shape == (1, 4, 8, 8) and y.shape == (1, 6, 1, 1) and z.shape == (1, 3, 16, 16)
        loaded = sorted(m for m in sys.modules if m == "diffusers" or m.startswith("diffusers."))
        print(loaded)
        sys.exit(1 if loaded else 0)
    ''')
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
