"""Optimus text VAE keys (original SHI-Labs layouts) -> `vd.nn.optimus.OptimusVAE` names.

Our module is named like the original, so the map is: strip the file's prefix, drop two kinds of keys.
  pretrained_pth/optimus-vae.pth                  encoder.* decoder.*        (no prefix)
  vd-four-flow-v1-0-deprecated.pth (Nov 2022)     optimus.encoder.* ...
  the current model's full state dict             vae.text.encoder.* ...
Every key is either ours (and names the part, encoder or decoder, it fills) or ignored for a stated reason.
"""

from collections.abc import Mapping

from torch import Tensor

PREFIXES = ("", "optimus.", "vae.text.")
WHY_CAUSAL_MASK = "GPT-2's constant causal-mask buffer (attn.bias); our attention builds its mask"
WHY_TIED_HEAD = "decoder.lm_head.weight is decoder.transformer.wte.weight (tied); our logits use wte"


def route(key: str, prefix: str = "") -> tuple[str, str] | str | None:
    """(our part, our key) for a source key under `prefix`, or the reason it is ignored; None: not Optimus'."""
    if not key.startswith(prefix):
        return None
    ours = key[len(prefix):]
    if ours == "decoder.lm_head.weight":
        return WHY_TIED_HEAD
    if ours.startswith("decoder.transformer.h.") and ours.endswith(".attn.bias"):
        return WHY_CAUSAL_MASK
    part = ours.split(".")[0]
    return (part, ours) if part in ("encoder", "decoder") else None


def convert(state: Mapping[str, Tensor], prefix: str | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """An Optimus state dict (prefix guessed when None) -> (our state dict, {ignored key: reason}).

    Keys outside the prefix are left alone (a full-model file holds other components); keys inside it that
    are neither ours nor known to be ignorable raise KeyError."""
    if prefix is None:
        prefix = next((p for p in PREFIXES[1:] if any(k.startswith(p + "decoder.") or k.startswith(p + "encoder.")
                                                       for k in state)), "")
    ours, ignored = {}, {}
    for key, tensor in state.items():
        if not key.startswith(prefix):
            continue
        r = route(key, prefix)
        if r is None:
            raise KeyError(f"{key!r}: not a key of the Optimus text VAE")
        if isinstance(r, str):
            ignored[key] = r
        else:
            ours[r[1]] = tensor
    return ours, ignored
