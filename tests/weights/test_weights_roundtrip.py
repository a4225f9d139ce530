"""Real tensors through every reader: the tiny reference pipeline, saved by diffusers (safetensors and .bin), and
rewritten in both original SHI-Labs layouts, loads through our loader and generates what the reference generates.

The original-layout files are made by running our key tables (weights_convert.keymaps) backwards over the tiny
reference state dicts, so every table is round-tripped on real values; tests/weights/test_weights_manifests.py checks
the same tables against the real checkpoints' key lists. Original-layout files need the tiny configs, which
only `open_checkpoint(configs=...)` takes, so those loads go through Checkpoint + vd.loading directly.
Also here: lean per-task loading and the hub download (snapshot_download faked from a local folder).
"""

import copy
import fnmatch
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tiny_pipeline as tp
from helpers import REPO, random_image, seeded

diffusers = pytest.importorskip("diffusers")

from vd import VersatileDiffusion  # noqa: E402
from vd.loading import load_components  # noqa: E402
from vd.tasks import TASK_PARTS, parts_for  # noqa: E402
from weights_convert import Checkpoint, CheckpointError, open_checkpoint  # noqa: E402
from weights_convert.convert import convert  # noqa: E402
from weights_convert import keymaps as km  # noqa: E402
from weights_convert.layouts import SCHEDULE_BUFFERS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore:.*rescale already rescaled.*", "ignore:.*weights_only.*")
CPU, F32 = torch.device("cpu"), torch.float32
STEPS = 2


# ---- fixtures: the tiny reference saved both ways, and the same weights in the original layouts

@pytest.fixture(scope="module")
def components():
    return tp.build_components(seed=0)


@pytest.fixture(scope="module")
def folders(components, tmp_path_factory):
    """{"safetensors": folder, "bin": folder}, both written by diffusers' save_pretrained."""
    from diffusers import VersatileDiffusionPipeline
    root = tmp_path_factory.mktemp("diffusers")
    st = tp.save(components, root / "st")
    binary = root / "bin"
    VersatileDiffusionPipeline(**copy.deepcopy(components)).save_pretrained(binary, safe_serialization=False)
    tp.write_optimus(binary / "pretrained_pth", 4)  # the same Optimus as tp.save's
    tp.write_optimus_tokenizer(binary / "optimus_tokenizer")
    for c in ("text_encoder", "image_encoder"):  # transformers 5 writes safetensors regardless: write the .bin
        f = binary / c / "model.safetensors"
        if f.is_file():
            torch.save(load_file(f), binary / c / "pytorch_model.bin")
            f.unlink()
    for c in ("image_unet", "text_unet", "vae", "text_encoder", "image_encoder"):
        assert [p.suffix for p in (binary / c).iterdir() if p.suffix in (".bin", ".safetensors")] == [".bin"], c
    return {"safetensors": st, "bin": binary}


@pytest.fixture(scope="module")
def originals(folders, tmp_path_factory):
    return tp.write_originals(folders["safetensors"], tmp_path_factory.mktemp("hub_repo") / "vd",
                              tmp_path_factory.mktemp("deprecated"))


# ---- running the three tasks

CALLS = {
    "text_to_image": dict(prompt="the cat"),
    "image_variation": dict(image=random_image(1)),
    "dual_guided": dict(prompt="the cat", image=random_image(1), text_to_image_strength=0.75),
}


def run_ours(pipe: VersatileDiffusion, task: str) -> np.ndarray:
    return getattr(pipe, task)(**CALLS[task], num_inference_steps=STEPS, generator=seeded(), output_type="np",
                               progress=False).images


def run_reference(task: str, folder) -> np.ndarray:
    return tp.reference(task, folder)(**CALLS[task], num_inference_steps=STEPS, generator=seeded(),
                                      output_type="np").images


TASKS = ("text_to_image", "image_variation", "dual_guided")  # the tasks diffusers has too


def pipeline(ckpt: Checkpoint, tasks=TASKS) -> VersatileDiffusion:
    """What from_pretrained builds, from an opened checkpoint (for checkpoints that need configs=)."""
    return VersatileDiffusion(load_components(ckpt, tasks, CPU, F32), tasks=tuple(tasks), device=CPU, dtype=F32,
                              uncond_image="diffusers")


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


@pytest.fixture(scope="module")
def expected(folders):
    """Our outputs from the diffusers-layout (safetensors) folder: what every other layout must reproduce."""
    pipe = VersatileDiffusion.from_pretrained(folders["safetensors"], uncond_image="diffusers")
    return {task: run_ours(pipe, task) for task in TASKS}


# ---- diffusers folders, as save_pretrained writes them

@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_diffusers_folder_matches_reference(fmt, folders, expected, patched_dual, check):
    folder = folders[fmt]
    ours = VersatileDiffusion.from_pretrained(folder, uncond_image="diffusers")
    for task in TASKS:
        got = run_ours(ours, task)
        check(_diff(got, run_reference(task, folder)), 1e-5, f"{task} vs diffusers")
        check(_diff(got, expected[task]), 0.0, f"{task} vs safetensors load")


def test_bin_and_safetensors_give_the_same_tensors(folders):
    a, b = open_checkpoint(folders["safetensors"]), open_checkpoint(folders["bin"])
    assert a.parts == b.parts and len(a.parts) == 11
    for part in a.parts:
        ta, tb = a.load(part), b.load(part)
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta), part


def test_sharded_fp16_variant_folders(folders, tmp_path):
    """save_pretrained(variant="fp16") with shards names its index X.safetensors.index.fp16.json (diffusers and
    transformers): read, with the same (fp16-rounded) tensors."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection
    src = folders["safetensors"]
    out = shutil.copytree(src, tmp_path / "vd")
    for c, cls in (("image_unet", UNet2DConditionModel), ("text_encoder", CLIPTextModelWithProjection)):
        shutil.rmtree(out / c)
        cls.from_pretrained(src / c).half().save_pretrained(out / c, variant="fp16", max_shard_size="20KB")
        assert len(list((out / c).glob("*.index.fp16.json"))) == 1 and len(list((out / c).glob("*.fp16*"))) > 2
    a, b = open_checkpoint(src), open_checkpoint(out)
    for part in ("image_unet.data", "image_unet.context", "text_encoder"):
        want, got = a.load(part), b.load(part)
        assert want.keys() == got.keys() and all(torch.equal(want[k].half(), got[k]) for k in want), part


def test_transformers_single_file_before_its_index(folders, tmp_path):
    """A CLIP folder with model.safetensors and a shard index: transformers reads the single file, so do we (a
    diffusers model folder reads its index first, as diffusers does)."""
    from transformers import CLIPTextModelWithProjection
    out = shutil.copytree(folders["safetensors"], tmp_path / "vd")
    model = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder")
    with torch.no_grad():
        model.text_projection.weight.mul_(2)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    for f in (tmp_path / "sharded").iterdir():
        shutil.copy(f, out / "text_encoder" / f.name)
    assert (out / "text_encoder" / "model.safetensors.index.json").is_file()
    single = open_checkpoint(folders["safetensors"]).load("text_encoder")
    got = open_checkpoint(out).load("text_encoder")
    assert all(torch.equal(single[k], got[k]) for k in single)


# ---- the two original layouts

def _assert_same_tensors(ckpt: Checkpoint, reference: Checkpoint) -> None:
    assert ckpt.parts == reference.parts
    for part in ckpt.parts:
        got, want = ckpt.load(part), reference.load(part)
        assert got.keys() == want.keys(), part
        for k in got:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), f"{part} {k}"


def test_current_original_layout(originals, folders, expected, check):
    """vd-four-flow-v1-0.pth + kl-f8.pth beside it; CLIP, tokenizer and preprocessing from the repo folder
    two levels up (found by default). The text UNet's time MLP is the image UNet's, as in the original."""
    ckpt = open_checkpoint(originals["current"], configs=originals["configs"])
    assert sorted(k.split(": ")[1] for k in ckpt.ignored) == sorted([*SCHEDULE_BUFFERS, *tp.OPTIMUS_CONSTANTS])
    assert {s.file.path.name for s in ckpt.sources["vae.decoder"].values()} == {"kl-f8.pth"}
    q = ckpt.sources["vae.decoder"]["decoder.mid_block.attentions.0.to_q.weight"]
    assert q.key == "decoder.mid.attn_1.q.weight" and len(q.file.shape(q.key)) == 4 and len(q.shape()) == 2
    assert {s.file.path.name for s in ckpt.sources["image_unet.data"].values()} == {"vd-four-flow-v1-0.pth"}
    _assert_same_tensors(ckpt, open_checkpoint(folders["safetensors"]))
    pipe = pipeline(ckpt)
    for task in TASKS:
        check(_diff(run_ours(pipe, task), expected[task]), 1e-6, task)


def test_clip_folder_that_is_not_there(originals, tmp_path):
    with pytest.raises(CheckpointError, match="no-clip: no such folder"):
        open_checkpoint(originals["current"], configs=originals["configs"], clip=tmp_path / "no-clip")


def test_kl_f8_file_that_is_not_there(originals, tmp_path):
    """A kl_f8= path given is checked whatever the tasks, and the error names the argument."""
    for need in (None, ["text_unet.data"]):
        with pytest.raises(CheckpointError, match=r"^kl_f8: .*no-vae\.pth: no such file$"):
            open_checkpoint(originals["current"], configs=originals["configs"], kl_f8=tmp_path / "no-vae.pth",
                            need=need)


def test_deprecated_original_layout(originals, folders, expected, check):
    """vd-four-flow-v1-0-deprecated.pth: UNets, autokl, both CLIP towers under clip.model, plus the keys we skip
    (logit_scale, position_ids, Optimus' tied head and masks, the schedule). Only the tokenizers come from a
    diffusers folder."""
    ckpt = open_checkpoint(originals["deprecated"], configs=originals["configs"], clip=folders["safetensors"])
    ignored = sorted(k.split(": ")[1] for k in ckpt.ignored)
    assert ignored == sorted([*SCHEDULE_BUFFERS, *(f"optimus.{k}" for k in tp.OPTIMUS_CONSTANTS), "clip.model.logit_scale",
                              "clip.model.text_model.embeddings.position_ids"])
    assert {s.file.path for p in ckpt.parts for s in ckpt.sources[p].values()} == {originals["deprecated"]}
    _assert_same_tensors(ckpt, open_checkpoint(folders["safetensors"]))
    pipe = pipeline(ckpt)
    for task in TASKS:
        check(_diff(run_ours(pipe, task), expected[task]), 1e-6, task)


@pytest.mark.parametrize("layout", ["current", "deprecated"])
def test_converted_original_loads_with_from_pretrained(layout, originals, folders, expected, tmp_path, check):
    """Converted once (with the tiny configs), an original checkpoint loads like any other folder: the configs
    travel in the output's config.json."""
    out = convert(originals[layout], tmp_path / "out", configs=originals["configs"], clip=folders["safetensors"])
    pipe = VersatileDiffusion.from_pretrained(out, uncond_image="diffusers")
    for task in TASKS:
        check(_diff(run_ours(pipe, task), expected[task]), 0.0, task)


def test_deprecated_without_tokenizer_is_not_converted(originals, tmp_path):
    """Its CLIP text tower without a tokenizer could run no text task: refused at conversion, not at load time."""
    with pytest.raises(CheckpointError, match="has no tokenizer"):
        convert(originals["deprecated"], tmp_path / "out", configs=originals["configs"])
    assert list(tmp_path.iterdir()) == []
    out = convert(originals["deprecated"], tmp_path / "out", configs=originals["configs"],
                  parts=parts_for(["image_variation"]))
    assert "tokenizer" not in {p.name for p in out.iterdir()}


def test_tables_round_trip_exactly(folders):
    """Our key -> original key -> our key is the identity for every table (keys and values)."""
    st = folders["safetensors"]
    cfg = tp.tiny_configs(st)
    cases = [("image_unet", km.unet_layers_v1(cfg["image_unet"], "m.unet_image", "m.time_embed")),
             ("image_unet", km.unet_layers_v2(cfg["image_unet"], "d.image", with_time=True)),
             ("vae", km.vae_layers_ldm(cfg["vae"])), ("vae", km.vae_layers_ldm(cfg["vae"], "autokl")),
             ("text_encoder", km.clip_layers("clip.model")[0]), ("image_encoder", km.clip_layers("clip.model")[1])]
    text = {k: v for k, v in tp.state_of(st, "text_unet").items() if not k.startswith("time_embedding.")}
    cases_text = [km.unet_layers_v1(cfg["text_unet"], "m.unet_text", None),
                  km.unet_layers_v2(cfg["text_unet"], "d.text", with_time=False)]
    for state, layers in [(tp.state_of(st, c), L) for c, L in cases] + [(text, L) for L in cases_text]:
        original = tp.to_original(state, layers)
        by_source = {L.source: L for L in layers}
        back = {}
        for key, t in original.items():
            layer, suffix = km.find_layer(by_source, key)
            new = km.rename(suffix, layer.renames)
            back[f"{layer.target}.{new}" if layer.target else new] = layer.transform(t) if layer.transform else t
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k]) for k in state)


# ---- lean loading: a task builds and reads only the parts it needs

def _no_meta(module) -> bool:
    return not any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def test_text_to_image_loads_only_its_parts(folders, loaded_parts):
    pipe = VersatileDiffusion.from_pretrained(folders["safetensors"], tasks=["text_to_image"])
    assert sorted(loaded_parts) == sorted(TASK_PARTS["text_to_image"])
    c = pipe.components
    text_unet = dict(c.text_unet.named_parameters())
    assert text_unet and all(".attentions." in k for k in text_unet)  # no data layer, no time MLP
    assert not hasattr(c.text_unet, "conv_in") and not hasattr(c.text_unet, "time_embedding")
    assert all(not hasattr(b, "resnets") for b in [*c.text_unet.down_blocks, c.text_unet.mid_block,
                                                   *c.text_unet.up_blocks])
    image_unet = dict(c.image_unet.named_parameters())
    assert "conv_in.weight" in image_unet and "time_embedding.linear_1.weight" in image_unet
    assert not any(".attentions." in k for k in image_unet)  # the image context layers are not needed
    assert hasattr(c.vae, "encoder") and hasattr(c.vae, "decoder")  # the encoder for init images
    assert c.image_encoder is None and c.image_processor is None
    assert all(_no_meta(m) for m in (c.image_unet, c.text_unet, c.vae, c.text_encoder))
    assert run_ours(pipe, "text_to_image").shape == (1, 64, 64, 3)


def test_image_variation_loads_no_text_side(folders, loaded_parts):
    pipe = VersatileDiffusion.from_pretrained(folders["safetensors"], tasks=["image_variation"])
    assert sorted(loaded_parts) == sorted(TASK_PARTS["image_variation"])
    c = pipe.components
    assert c.text_encoder is None and c.text_unet is None and c.tokenizer is None
    assert hasattr(c.vae, "encoder")  # for fidelity and init images
    assert all(_no_meta(m) for m in (c.image_unet, c.vae, c.image_encoder))
    with pytest.raises(ValueError, match="text_to_image"):
        pipe.text_to_image("the cat")


# ---- hub download, with snapshot_download faked from a local folder

class FakeHub:
    """snapshot_download over a local folder: copies the files matching allow_patterns (fnmatch, as
    huggingface_hub does) into one snapshot folder, and records every call."""

    def __init__(self, repo, snapshot):
        self.repo, self.snapshot, self.calls = repo, snapshot, []

    def __call__(self, repo_id, *, revision=None, allow_patterns=None, **kw):
        self.calls.append(list(allow_patterns))
        for f in self.repo.rglob("*"):
            rel = f.relative_to(self.repo).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (self.snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, self.snapshot / rel)
        return str(self.snapshot)

    def files(self) -> set[str]:
        return {f.relative_to(self.snapshot).as_posix() for f in self.snapshot.rglob("*") if f.is_file()}


@pytest.fixture
def hub_repo(folders, tmp_path):
    """A hub repo with both weight formats for every component, except the VAE, which has only .bin."""
    repo = tmp_path / "repo"
    shutil.copytree(folders["safetensors"], repo)
    for c in ("image_unet", "text_unet", "text_encoder", "image_encoder", "vae"):
        for f in (folders["bin"] / c).glob("*.bin"):
            shutil.copy(f, repo / c / f.name)
    (repo / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    return repo


def test_hub_download_fetches_only_what_the_task_needs(hub_repo, tmp_path, monkeypatch, expected, check):
    import huggingface_hub
    hub = FakeHub(hub_repo, tmp_path / "snapshot")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    pipe = VersatileDiffusion.from_pretrained("tiny-org/tiny-vd", tasks=["text_to_image"], uncond_image="diffusers")
    got = hub.files()
    assert {f.split("/")[0] for f in got} == {"model_index.json", "scheduler", "tokenizer", "image_unet", "text_unet",
                                              "vae", "text_encoder"}
    assert not any(f.startswith(("image_encoder/", "image_feature_extractor/")) for f in got)
    assert not any(p.startswith(("image_encoder/", "image_feature_extractor/")) for call in hub.calls for p in call)
    # safetensors preferred; .bin only for the component that has no safetensors (a second, narrower request)
    weights = {f for f in got if f.endswith((".bin", ".safetensors"))}
    assert weights == {"image_unet/diffusion_pytorch_model.safetensors",
                       "text_unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                       "vae/diffusion_pytorch_model.bin"}
    assert len(hub.calls) == 2
    assert not any(p.endswith(".bin") for p in hub.calls[0])
    assert {p.split("/")[0] for p in hub.calls[1] if p.endswith(".bin")} == {"vae"}
    check(_diff(run_ours(pipe, "text_to_image"), expected["text_to_image"]), 0.0, "hub text_to_image")


def test_hub_download_for_image_to_text(hub_repo, tmp_path, monkeypatch):
    """The text flows also fetch pretrained_pth/optimus-vae.pth (and the repo's tokenizer folder, if any); one
    request, since every component they need has safetensors."""
    import huggingface_hub
    hub = FakeHub(hub_repo, tmp_path / "snapshot")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    pipe = VersatileDiffusion.from_pretrained("tiny-org/tiny-vd", tasks=["image_to_text"])
    files = set(hub.files())
    assert {f.split("/")[0] for f in files} == {"model_index.json", "scheduler", "image_unet", "text_unet",
                                                "image_encoder", "image_feature_extractor", "pretrained_pth",
                                                "optimus_tokenizer"}
    assert {f for f in files if f.startswith("pretrained_pth/")} == {"pretrained_pth/optimus-vae.pth",
                                                                     "pretrained_pth/optimus-vae.json"}
    assert len(hub.calls) == 1
    assert pipe.components.optimus is not None and pipe.components.vae is None


def test_hub_download_for_image_variation(hub_repo, tmp_path, monkeypatch):
    import huggingface_hub
    hub = FakeHub(hub_repo, tmp_path / "snapshot")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    VersatileDiffusion.from_pretrained("tiny-org/tiny-vd", tasks=["image_variation"])
    components = {f.split("/")[0] for f in hub.files()}
    assert components == {"model_index.json", "scheduler", "image_unet", "vae", "image_encoder",
                          "image_feature_extractor"}


def test_meta_builds_skip_initialisers_only_while_building():
    """build_meta skips the constructors' random fills of meta tensors (there is nothing to fill); real tensors,
    modules built afterwards, and modules built in another thread meanwhile are initialised as usual."""
    import threading

    from helpers import TINY_UNET_A
    from vd.nn import UNetConfig
    from weights_convert.checkpoint import _SkipInit, build_meta

    unet = build_meta("image_unet", UNetConfig.from_diffusers(TINY_UNET_A), {"global", "data", "context"})
    assert all(p.is_meta for p in unet.parameters())
    other = []
    with torch.device("meta"), _SkipInit():
        t = threading.Thread(target=lambda: other.append(torch.nn.Linear(64, 64)))
        t.start()
        t.join()
        real = torch.nn.init.ones_(torch.empty(3, device="cpu"))  # only meta tensors are skipped
    assert torch.equal(real, torch.ones(3))
    after = torch.nn.Linear(64, 64)
    for layer in (other[0], after):
        assert not layer.weight.is_meta and layer.weight.std() > 0.01 and layer.bias.abs().max() > 0


META_IMPORTS = """
import sys, torch
import torch.utils._device  # what get_default_device imports, imported before the spy asks it
from vd.nn.optimus import OptimusConfig
from weights_convert.checkpoint import build_meta

first_imported_on_meta = []

class Spy:  # asked only for modules not imported yet
    def find_spec(self, name, path=None, target=None):
        if torch.get_default_device().type == "meta":
            first_imported_on_meta.append(name)

sys.meta_path.insert(0, Spy())
tiny = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, projection_dim=8)
build_meta("text_encoder", dict(tiny, vocab_size=10, max_position_embeddings=8), {""})
build_meta("image_encoder", dict(tiny, image_size=8, patch_size=4), {""})
build_meta("optimus", OptimusConfig(latent_dim=8, enc_vocab=10, enc_dim=8, enc_layers=1, enc_heads=2, enc_mlp_dim=16,
                                    enc_positions=8, dec_vocab=10, dec_dim=8, dec_layers=1, dec_heads=2,
                                    dec_positions=8), {"encoder", "decoder"})
assert "transformers" in sys.modules
print(first_imported_on_meta)
"""


def test_meta_builds_import_nothing_on_the_meta_device():
    """transformers' CLIP and BERT modules are imported before the meta device becomes the default: a module first
    imported under it runs its import-time code there, which fails on torch 2.6 (the import of torch._dynamo
    that transformers' models pull in). Checked in a fresh interpreter, where nothing is imported yet."""
    run = subprocess.run([sys.executable, "-c", META_IMPORTS], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
