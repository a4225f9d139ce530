"""The Brain-Diffuser reconstruction recipe against the ORIGINAL code, fp32: init latent noised to a start index,
then dual-context (image + text tokens, mixed) classifier-free-guided DDIM.

tests/golden/make_research_golden.py ran Brain-Diffuser's `stochastic_encode` + `decode_dc` (on SHI-Labs 51dcd3b's
model code, cross-checked there against cf0f4a2's `sample_multicontext` from x0) on flows.json's tiny random UNets
and recorded the results (see its docstring). Here the weights are rebuilt and converted by our reader exactly as
for tests/pipeline/test_original_flows.py (its `golden` fixture), and our functional core is checked within 1e-5 of each
output's scale, together with the original's timesteps and noise draw:
- t_enc = int(strength * N); x0 is noised to the ascending DDIM grid's entry at index t_enc
  (t_enc * (1000 // N) + 1) with one draw of global-RNG noise for the whole batch, then the grid entries
  t_enc - 1 down to 0 are denoised;
- the image stream (weight mixed_ratio = 1 - mixing) and the text stream (weight mixing) are mixed in both halves
  of classifier-free guidance: the unconditional half uses uim and utx with the same weights;
- the published loop seeds once, and its DDIM draws a noise per step run even at eta 0 (and multiplies it by 0):
  item after item, one generator gives the original's noise and outputs when those draws are made too.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import GOLDEN, rel_err
from test_original_flows import cfg_eps_fn, ddim, golden  # noqa: F401 - `golden` is the shared weights fixture
from vd import sampling as core
from vd.sampling import noised_start, sample
from vd.sched import randn

TOL = 1e-5




@pytest.fixture(scope="module")
def research():
    return json.loads((GOLDEN / "research.json").read_text()), load_file(GOLDEN / "research.safetensors")


def _eps_fn(meta, data, unets, case):
    """decode_dc's guided predictor: image stream uim/cim at mixed_ratio, text stream utx/ctx at mixing."""
    r = meta["mixed_ratio"]
    streams = [("image", data[f"{case}.uim"], data[f"{case}.cim"], r),
               ("text", data[f"{case}.utx"], data[f"{case}.ctx"], 1 - r)]
    return cfg_eps_fn(unets, "image", streams, meta["guidance_scale"])


def _dual_nets(unets) -> core.Nets:
    return core.Nets(image=unets["image"], text=None, image_context=unets["image"].context_layers(),
                     text_context=unets["text"].context_layers())


CASES = ["recipe", "n10"]


@pytest.mark.parametrize("case", CASES)
def test_timesteps(research, case):
    """t_enc = int(strength * N); noised to ascending grid[t_enc], then grid[t_enc - 1], ..., grid[0] denoised."""
    meta, _ = research
    c = meta["cases"][case]
    n, t_enc = c["steps"], c["t_enc"]
    assert t_enc == int(c["strength"] * n)
    grid = ddim().timesteps(n).flip(0).tolist()  # ascending: k * (1000 // N) + 1
    assert grid == [k * (1000 // n) + 1 for k in range(n)]
    assert c["noised_to_t"] == grid[t_enc]
    assert c["visited"] == grid[:t_enc][::-1]


@pytest.mark.parametrize("case", CASES)
def test_noise_draw(research, case):
    """A torch.Generator seeded like the original's global RNG (torch.manual_seed) gives its noise: one draw of
    x0's shape for the whole batch."""
    meta, data = research
    x0 = data[f"{case}.x0"]
    z = randn(x0.shape, torch.Generator().manual_seed(meta["cases"][case]["noise_seed"]), x0.device, x0.dtype)
    assert torch.equal(z, data[f"{case}.noise"])


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_recipe(golden, research, case, check):  # noqa: F811
    """stochastic_encode + decode_dc end to end: our noised start, our loop from the original's start, and ours
    from ours."""
    meta, data = research
    _, _, unets = golden
    c = meta["cases"][case]
    n, t_enc = c["steps"], c["t_enc"]
    sampler = ddim()
    start = noised_start(sampler, data[f"{case}.x0"], n, t_enc, torch.Generator().manual_seed(c["noise_seed"]))
    check(rel_err(start, data[f"{case}.z_enc"]), TOL, "noised start")

    eps_fn = _eps_fn(meta, data, unets, case)
    visited = []
    loop = sample(sampler, eps_fn, data[f"{case}.z_enc"], n, t_enc=t_enc,
                  callback=lambda i, t, x: visited.append(int(t)))
    assert visited == c["visited"]
    check(rel_err(loop, data[f"{case}.out"]), TOL, "loop from the original's start")
    got = sample(sampler, eps_fn, start, n, t_enc=t_enc)
    check(rel_err(got, data[f"{case}.out"]), TOL, "end to end")


def test_start_index_zero(research):
    """t_enc = 0: the original's decode_dc denoises nothing and returns its input; so does ours."""
    meta, data = research
    assert meta["edges"]["decode_dc t_start=0"] == "returns its input"
    x = data["n10.z_enc"]
    never = lambda x, t: pytest.fail("no step may run")  # noqa: E731
    assert torch.equal(sample(ddim(), never, x, meta["cases"]["n10"]["steps"], t_enc=0), x)


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_recipe_through_the_core_flow(golden, research, case, check):  # noqa: F811
    """The same recipe as a research user writes it with vd.sampling: noised_start, then the dual_guided flow with
    the text weight `mixing` = 1 - mixed_ratio and [uncond; cond] tokens."""
    meta, data = research
    _, _, unets = golden
    c = meta["cases"][case]
    nets = _dual_nets(unets)
    g = meta["guidance_scale"]
    text = core.guided_tokens(data[f"{case}.ctx"], data[f"{case}.utx"], g)
    image = core.guided_tokens(data[f"{case}.cim"], data[f"{case}.uim"], g)
    s = core.Sampling(sampler=ddim(), num_steps=c["steps"], guidance_scale=g,
                      t_enc=core.start_step(c["strength"], c["steps"]))
    x = core.noised_start(s.sampler, data[f"{case}.x0"], s.num_steps, s.t_enc,
                          torch.Generator().manual_seed(c["noise_seed"]))
    got = core.dual_guided(nets, text, image, 1 - meta["mixed_ratio"], x, s)
    check(rel_err(got, data[f"{case}.out"]), TOL, "dual_guided flow")


@torch.no_grad()
def test_seeded_once_loop(golden, research, check):  # noqa: F811
    """The published script seeds once before its loop, so an item's start noise depends on the items before it.
    One generator seeded like the original's RNG gives every item's noise and output when it is passed to every
    item's start and then draws, per step run, the noise the original's DDIM draws and multiplies by 0 at eta 0."""
    meta, data = research
    _, _, unets = golden
    c = meta["loop"]
    gs = meta["guidance_scale"]
    s = core.Sampling(sampler=ddim(), num_steps=c["steps"], guidance_scale=gs,
                      t_enc=core.start_step(c["strength"], c["steps"]))
    assert c["draws_per_item"] == 1 + s.t_enc
    text_weight, nets = 1 - meta["mixed_ratio"], _dual_nets(unets)
    g = torch.Generator().manual_seed(c["noise_seed"])
    plain = torch.Generator().manual_seed(c["noise_seed"])  # the stream without the step draws
    for k in range(c["items"]):
        x0 = data["loop.x0"][k:k + 1]
        z = randn(x0.shape, torch.Generator().set_state(g.get_state()), x0.device, x0.dtype)
        assert torch.equal(z, data["loop.noise"][k:k + 1]), k
        assert torch.equal(randn(x0.shape, plain, x0.device, x0.dtype), z) == (k == 0), k  # the step draws count
        start = core.noised_start(s.sampler, x0, s.num_steps, s.t_enc, g)
        text = core.guided_tokens(data["loop.ctx"][k:k + 1], data["loop.utx"], gs)
        image = core.guided_tokens(data["loop.cim"][k:k + 1], data["loop.uim"], gs)
        got = core.dual_guided(nets, text, image, text_weight, start, s)
        check(rel_err(got, data["loop.out"][k:k + 1]), TOL, f"item {k}")
        for _ in range(s.t_enc):
            randn(x0.shape, g, x0.device, x0.dtype)
