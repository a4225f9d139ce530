"""Broken checkpoints fail before any model is built, with a CheckpointError (a ValueError) that names the file
and, where there is one, the key: missing folders, damaged files, pickles that hold more than tensors, wrong
dtypes and shapes, missing and unexpected keys, configs that contradict the weights.

Each case damages a copy of the tiny pipeline that diffusers' save_pretrained wrote (built once per module);
the original-layout cases use meta-tensor files from the real key manifests (no data)."""

import json
import os
import pickle
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_pipeline as tp
from manifests import read_manifest

pytest.importorskip("diffusers")
from vd import VersatileDiffusion  # noqa: E402
from weights_convert import CheckpointError, TensorFile, open_checkpoint  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore:.*weights_only.*", "ignore:.*pickle protocol.*")
UNET_FILE = "image_unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return tp.save(tp.build_components(seed=0), tmp_path_factory.mktemp("tiny") / "vd")


@pytest.fixture
def folder(pristine, tmp_path):
    """A fresh copy of the tiny diffusers folder to damage."""
    return shutil.copytree(pristine, tmp_path / "vd")


def _raises(folder, *names: str, tasks=None, **kwargs) -> str:
    """Loading fails with a CheckpointError whose message contains every one of `names`; returns it."""
    with pytest.raises(CheckpointError) as info:
        VersatileDiffusion.from_pretrained(folder, tasks=tasks, **kwargs)
    msg = str(info.value)
    for name in names:
        assert str(name) in msg, f"{name!r} not in: {msg}"
    assert isinstance(info.value, ValueError)
    return msg


def _edit_weights(path, fn) -> None:
    sd = load_file(path)
    fn(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, path)


def test_pristine_copy_loads(folder):
    VersatileDiffusion.from_pretrained(folder, tasks=["text_to_image"])


# ---- missing pieces

def test_missing_component_folder(folder):
    shutil.rmtree(folder / "image_encoder")
    VersatileDiffusion.from_pretrained(folder, tasks=["text_to_image"])  # not needed there: fine
    msg = _raises(folder, folder, "image_encoder", "image_variation", tasks=["image_variation"])
    assert "image_unet" not in msg  # names only what is missing


def test_missing_tokenizer_folder(folder):
    shutil.rmtree(folder / "tokenizer")
    _raises(folder, folder, "tokenizer", tasks=["text_to_image"])


def test_damaged_shard_index(folder):
    st = folder / UNET_FILE
    index = st.parent / "diffusion_pytorch_model.safetensors.index.json"
    st.rename(st.parent / "shard-1.safetensors")
    index.write_text(json.dumps({"metadata": {}, "weight_map": ["shard-1.safetensors"]}))
    _raises(folder, index, "weight_map")


def test_converted_folder_without_its_tokenizer(pristine, tmp_path):
    from weights_convert.convert import convert
    out = convert(pristine, tmp_path / "conv")
    shutil.rmtree(out / "tokenizer")
    _raises(out, out / "tokenizer", "missing", tasks=["text_to_image"])
    VersatileDiffusion.from_pretrained(out, tasks=["image_variation"])  # which needs no tokenizer


def test_missing_weight_file(folder):
    (folder / UNET_FILE).unlink()
    _raises(folder, folder / "image_unet", "no weight file")


def test_missing_config_file(folder):
    (folder / "vae" / "config.json").unlink()
    _raises(folder, folder / "vae" / "config.json")


# ---- damaged files

@pytest.mark.parametrize("cut", ["half", "last_bytes", "header_only", "empty"])
def test_truncated_safetensors(folder, cut):
    f = folder / UNET_FILE
    data = f.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    f.write_bytes({"half": data[:len(data) // 2], "last_bytes": data[:-3], "header_only": data[:header],
                   "empty": b""}[cut])
    _raises(folder, f, "safetensors")


@pytest.mark.parametrize("damage", ["random_bytes", "bad_header_json"])
def test_garbage_safetensors(folder, damage):
    f = folder / UNET_FILE
    data = bytearray(f.read_bytes())
    if damage == "random_bytes":
        data = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        data = bytes(data.tolist())
    else:
        data[8:24] = b"#" * 16
    f.write_bytes(bytes(data))
    _raises(folder, f, "not a readable safetensors file")


def _as_bin(folder, component="image_unet") -> tuple[dict, object]:
    """Replace the component's safetensors by a .bin (what older repos ship); returns its state dict and path."""
    st = folder / component / "diffusion_pytorch_model.safetensors"
    sd = load_file(st)
    st.unlink()
    return sd, folder / component / "diffusion_pytorch_model.bin"


@pytest.mark.parametrize("damage", ["truncated", "random_bytes", "empty"])
def test_damaged_bin(folder, damage):
    sd, f = _as_bin(folder)
    torch.save(sd, f)
    data = f.read_bytes()
    f.write_bytes({"truncated": data[:len(data) // 2], "empty": b"",
                   "random_bytes": bytes(torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(1),
                                                       dtype=torch.uint8).tolist())}[damage])
    _raises(folder, f, "not a readable PyTorch checkpoint")


# ---- pickles that hold more than tensors: refused, and nothing in them runs

class Payload:
    """Unpickling this would run code: it touches a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class PlainObject:
    pass


@pytest.mark.parametrize("kind", ["object", "code", "legacy_code", "legacy_format_code"])
def test_pickle_with_more_than_tensors_is_refused(folder, tmp_path, kind):
    marker = tmp_path / "code_ran"
    sd, f = _as_bin(folder)
    if kind == "object":
        torch.save({**sd, "evil": PlainObject()}, f)
    elif kind == "code":
        torch.save({**sd, "evil": Payload(marker)}, f)
    elif kind == "legacy_code":  # a bare pickle stream, not torch's zip container
        f.write_bytes(pickle.dumps({"evil": Payload(marker)}, protocol=2))
    else:  # torch's pre-1.6 format, which cannot be memory-mapped
        torch.save({"conv_in.bias": torch.zeros(3), "evil": Payload(marker)}, f, _use_new_zipfile_serialization=False)
    msg = _raises(folder, f, "refused", "PlainObject" if kind == "object" else "system")
    assert "nothing in it was run" in msg
    assert not marker.exists(), "the pickle's code ran"


def test_original_pth_with_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    pth = tmp_path / "vd-four-flow-v1-0.pth"
    torch.save({"diffuser.image.time_embed.0.weight": torch.zeros(2), "evil": Payload(marker)}, pth)
    with pytest.raises(CheckpointError, match=re.escape(str(pth)) + ".*refused"):
        open_checkpoint(pth)
    assert not marker.exists()


def test_non_tensor_entry_is_named(folder):
    sd, f = _as_bin(folder)
    torch.save({**sd, "step": 3}, f)
    _raises(folder, f, "'step'", "not a tensor")


def test_not_a_dict(tmp_path):
    f = tmp_path / "w.bin"
    torch.save([torch.zeros(1)], f)
    with pytest.raises(CheckpointError, match=re.escape(str(f)) + ".*dict of tensors"):
        TensorFile(f)


# ---- keys, dtypes and shapes against the configs

@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_integer_weight(folder, fmt):
    """A float parameter filled from an integer tensor: refused (a cast would hide a broken file)."""
    if fmt == "safetensors":
        f = folder / UNET_FILE
        _edit_weights(f, lambda sd: sd.__setitem__("conv_in.weight", sd["conv_in.weight"].long()))
    else:
        sd, f = _as_bin(folder)
        torch.save({**sd, "conv_in.weight": sd["conv_in.weight"].to(torch.int64)}, f)
    _raises(folder, f, "'conv_in.weight'", "int64", "floating-point")


def test_integer_weight_in_clip_tower(folder):
    f = folder / "text_encoder" / "model.safetensors"
    key = "text_model.final_layer_norm.weight"
    _edit_weights(f, lambda sd: sd.__setitem__(key, sd[key].to(torch.int32)))
    _raises(folder, f, repr(key), "floating-point")


def test_half_precision_weights_are_fine(folder):
    f = folder / UNET_FILE
    _edit_weights(f, lambda sd: sd.update({k: v.half() for k, v in sd.items()}))
    pipe = VersatileDiffusion.from_pretrained(folder, tasks=["text_to_image"], dtype=torch.float32)
    assert pipe.components.image_unet.conv_in.weight.dtype == torch.float32


def test_wrong_shape(folder, loaded_parts):
    """Named with both shapes and the config, before any weight of any part is read."""
    f = folder / UNET_FILE
    _edit_weights(f, lambda sd: sd.__setitem__("conv_in.weight", sd["conv_in.weight"][:, :2]))
    _raises(folder, f, "'conv_in.weight'", "[32, 2, 3, 3]", "[32, 4, 3, 3]", folder / "image_unet" / "config.json")
    assert loaded_parts == []


def test_missing_key(folder):
    f = folder / "vae" / "diffusion_pytorch_model.safetensors"
    _edit_weights(f, lambda sd: sd.pop("decoder.conv_out.bias"))
    _raises(folder, f, "missing", "'decoder.conv_out.bias'")


def test_missing_whole_part(folder):
    """A text UNet without its context layers: opening the checkpoint (as the converter does) checks every part and
    refuses it, and so does loading a task that needs those layers; a task that never reads the text UNet loads
    (loading checks what it fills)."""
    f = folder / "text_unet" / "diffusion_pytorch_model.safetensors"
    _edit_weights(f, lambda sd: [sd.pop(k) for k in list(sd) if ".attentions." in k])
    with pytest.raises(CheckpointError, match="missing text_unet weight .*attentions"):
        open_checkpoint(folder)
    _raises(folder, f, "missing", ".attentions.", tasks=["text_to_image"])
    assert VersatileDiffusion.from_pretrained(folder, tasks=["image_variation"]).components.text_unet is None


def test_optimus_file_is_opened_only_for_the_text_flows(folder):
    """pretrained_pth/optimus-vae.pth is not even unpickled by a load that needs no Optimus part, so a damaged one
    stops only the text flows (and open_checkpoint, which checks everything); an optimus= path must still exist."""
    f = folder / "pretrained_pth" / "optimus-vae.pth"
    f.write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        open_checkpoint(folder)
    _raises(folder, f, "not a readable PyTorch checkpoint", tasks=["image_to_text"])
    assert VersatileDiffusion.from_pretrained(folder, tasks=["text_to_image"]).components.optimus is None
    for tasks in (["text_to_image"], ["image_to_text"]):  # the argument named, whether the flows need it or not
        msg = _raises(folder, folder / "nowhere.pth", "no such file", tasks=tasks, optimus=folder / "nowhere.pth")
        assert msg.startswith("optimus: ")


def test_optimus_tokenizer_folder_without_its_files(folder, tmp_path):
    (tmp_path / "tok").mkdir()
    msg = _raises(folder, tmp_path / "tok", "missing vocab.txt, vocab.json, merges.txt", tasks=["image_to_text"],
                  optimus_tokenizer=tmp_path / "tok")
    assert msg.startswith("optimus_tokenizer: ")


def test_unexpected_optimus_key(folder):
    f = folder / "pretrained_pth" / "optimus-vae.pth"
    state = torch.load(f, weights_only=True)
    torch.save({**state, "lm.extra": torch.zeros(1)}, f)
    _raises(folder, f, "unexpected key 'lm.extra'", "not an Optimus text VAE weight", tasks=["image_to_text"])


def test_unexpected_key(folder):
    f = folder / UNET_FILE
    _edit_weights(f, lambda sd: sd.__setitem__("down_blocks.0.attentions.0.extra.weight", torch.zeros(3)))
    _raises(folder, f, "unexpected", "'down_blocks.0.attentions.0.extra.weight'")


def test_legacy_vae_names_still_load(folder):
    """diffusers < 0.14 wrote the VAE attention as query/key/value/proj_attn; those files must keep loading."""
    f = folder / "vae" / "diffusion_pytorch_model.safetensors"
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def rename(sd):
        for k in list(sd):
            for new, old in legacy.items():
                if f".attentions.0.{new}." in k:
                    sd[k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")] = sd.pop(k)
    _edit_weights(f, rename)
    assert any(".query." in k for k in load_file(f))
    VersatileDiffusion.from_pretrained(folder, tasks=["text_to_image"])


# ---- configs that contradict the weights

def _edit_config(path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def test_unet_config_contradicts_weights(folder):
    conf = folder / "image_unet" / "config.json"
    _edit_config(conf, block_out_channels=[16, 64])
    _raises(folder, folder / UNET_FILE, "'time_embedding.linear_1.bias'", "[128]", "[64]", conf)


def test_unet_config_with_fewer_levels(folder):
    conf = folder / "image_unet" / "config.json"
    _edit_config(conf, block_out_channels=[32], down_block_types=["CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D"])
    _raises(folder, folder / UNET_FILE, conf)


def test_unsupported_config(folder):
    conf = folder / "image_unet" / "config.json"
    _edit_config(conf, block_out_channels=[32, 64, 64])  # three levels, two block types
    _raises(folder, conf, "down_block_types")


def test_clip_config_contradicts_weights(folder):
    conf = folder / "text_encoder" / "config.json"
    _edit_config(conf, hidden_size=64)
    _raises(folder, folder / "text_encoder" / "model.safetensors", "has shape", conf)


def test_unreadable_config(folder):
    conf = folder / "text_unet" / "config.json"
    conf.write_text("{ not json")
    _raises(folder, conf, "JSON")


# ---- the original layouts (meta tensors with the real key names and shapes)

def _save_meta(path, shapes: dict, dtypes: dict | None = None) -> None:
    torch.save({k: torch.empty(s, device="meta", dtype=(dtypes or {}).get(k, torch.float32))
                for k, s in shapes.items()}, path)


@pytest.fixture(scope="module")
def current_manifest():
    return read_manifest("vd-four-flow-v1-0")


def test_original_unexpected_key(tmp_path, current_manifest):
    pth = tmp_path / "vd-four-flow-v1-0.pth"
    _save_meta(pth, {**current_manifest, "diffuser.image.data_blocks.99.0.weight": (3,)})
    with pytest.raises(CheckpointError, match=re.escape(str(pth)) + ".*'diffuser.image.data_blocks.99.0.weight'"):
        open_checkpoint(pth)


def test_original_missing_key(tmp_path, current_manifest):
    pth = tmp_path / "vd-four-flow-v1-0.pth"
    key = "diffuser.text.context_blocks.6.0.proj_in.weight"
    _save_meta(pth, {k: s for k, s in current_manifest.items() if k != key})
    ours = "'mid_block.attentions.0.proj_in.weight'"
    with pytest.raises(CheckpointError, match=re.escape(str(pth)) + ".*missing text_unet weight " + re.escape(ours)):
        open_checkpoint(pth)


def test_original_wrong_shape_and_dtype(tmp_path, current_manifest):
    pth = tmp_path / "vd-four-flow-v1-0.pth"
    key = "diffuser.text.data_blocks.17.0.weight"
    _save_meta(pth, {**current_manifest, key: (5120, 5119)})
    with pytest.raises(CheckpointError, match=re.escape(str(pth)) + f".*'{key}'.*5119.*VD preset"):
        open_checkpoint(pth)
    _save_meta(pth, current_manifest, {key: torch.int8})
    with pytest.raises(CheckpointError, match=re.escape(str(pth)) + f".*'{key}'.*int8.*floating-point"):
        open_checkpoint(pth)


def test_not_a_vd_checkpoint(tmp_path):
    pth = tmp_path / "other.pth"
    torch.save({"model.layer.weight": torch.zeros(2)}, pth)
    with pytest.raises(CheckpointError, match=re.escape(str(pth)) + ".*not a VD checkpoint"):
        open_checkpoint(pth)
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "nothing.pth")


# ---- only what the tasks need is opened (README: "a damaged text UNet does not stop image_variation")

TEXT_UNET_FILE = "text_unet/diffusion_pytorch_model.safetensors"


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_text_unet_does_not_stop_image_variation(folder, damage):
    f = folder / TEXT_UNET_FILE
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:1000])
    else:
        f.unlink()
    pipe = VersatileDiffusion.from_pretrained(folder, tasks=["image_variation"])
    img = pipe.image_variation(torch.rand(1, 3, 16, 16), num_inference_steps=1, height=16, width=16,
                               output_type="np", progress=False).images
    assert img.shape == (1, 16, 16, 3)
    _raises(folder, f if damage == "truncate" else folder / "text_unet", tasks=["text_to_image"])  # needed there


def test_converted_folder_opens_only_the_parts_of_its_tasks(pristine, tmp_path):
    from weights_convert.convert import convert
    out = convert(pristine, tmp_path / "conv")
    data = out / "text_unet.data.safetensors"  # text-to-image needs only the text UNet's context part
    data.write_bytes(data.read_bytes()[:100])
    VersatileDiffusion.from_pretrained(out, tasks=["text_to_image"])
    (out / "image_encoder.safetensors").unlink()
    VersatileDiffusion.from_pretrained(out, tasks=["text_to_image"])
    _raises(out, data, "safetensors", tasks=["text_variation"])
    _raises(out, out / "image_encoder.safetensors", "no such file", tasks=["image_variation"])


# ---- wrongly typed or inconsistent configs: refused when opened, naming the file and the key

@pytest.mark.parametrize("component,changes,key", [
    ("image_unet", dict(layers_per_block="2"), "layers_per_block"),
    ("image_unet", dict(norm_num_groups=5), "norm_num_groups"),        # does not divide 32 and 64 channels
    ("image_unet", dict(block_out_channels=[32, "64"]), "block_out_channels"),
    ("image_unet", dict(norm_eps="1e-5"), "norm_eps"),
    ("text_unet", dict(cross_attention_dim=16.0), "cross_attention_dim"),
    ("vae", dict(scaling_factor="0.18215"), "scaling_factor"),
    ("vae", dict(layers_per_block=[1]), "layers_per_block"),
    ("vae", dict(norm_num_groups=3), "norm_num_groups"),
    ("text_encoder", dict(hidden_size="32"), "hidden_size"),
    ("image_encoder", dict(num_attention_heads=5), "num_attention_heads"),  # does not divide hidden_size 32
    ("image_encoder", dict(patch_size=0), "patch_size"),
    ("image_unet", dict(num_attention_heads=2), "num_attention_heads"),  # diffusers' UNets refuse it too
    ("text_unet", dict(up_block_types=["UpBlockFlat", "CrossAttnUpBlock2D"]), "CrossAttnUpBlock2D"),  # 2D in flat
    ("text_unet", dict(mid_block_type="UNetMidBlock2DCrossAttn"), "mid_block_type"),
    ("image_unet", dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), "mid_block_type"),
    ("image_unet", dict(resnet_time_scale_shift="spatial"), "resnet_time_scale_shift"),  # options not built
    ("text_unet", dict(act_fn="gelu"), "act_fn='gelu' is not supported (only 'silu' or 'swish')"),
    ("image_unet", dict(time_embedding_act_fn="tanh"), "time_embedding_act_fn: expected null or one of"),
    ("text_unet", dict(timestep_post_act=["silu"]), "timestep_post_act: expected null or one of"),
])
def test_bad_config_value_names_file_and_key(folder, component, changes, key):
    conf = folder / component / "config.json"
    _edit_config(conf, **changes)
    tasks = ["text_to_image"] if component in ("text_unet", "text_encoder") else ["image_variation"]
    _raises(folder, conf, key, tasks=tasks)


def test_config_that_is_not_an_object(folder):
    conf = folder / "vae" / "config.json"
    conf.write_text("[1, 2]")
    _raises(folder, conf, "JSON object")


def test_converted_config_with_a_bad_value(pristine, tmp_path):
    from weights_convert.convert import convert
    out = convert(pristine, tmp_path / "conv", parts=["vae.encoder", "vae.decoder"])
    meta = json.loads((out / "config.json").read_text())
    meta["configs"]["vae"]["scaling_factor"] = "0.18215"
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"config\.json: configs\.vae: scaling_factor: expected a positive"):
        open_checkpoint(out)


def test_convert_takes_one_part_by_name(pristine, tmp_path):
    """parts="vae.decoder" is that one part (not its letters, refused as unknown parts)."""
    from weights_convert.convert import convert
    out = convert(pristine, tmp_path / "conv", parts="vae.decoder")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["vae.decoder.safetensors"]
    with pytest.raises(ValueError, match=r"parts: unknown \['vae'\]; expected some of"):
        convert(pristine, tmp_path / "other", parts="vae")
