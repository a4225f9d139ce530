"""Optimus text VAE keys (original SHI-Labs layouts) -> `vd.nn.optimus.OptimusVAE` names.

Our module is named like the original, so the map is: strip the file's prefix, drop two kinds of keys.
  pretrained_pth/optimus-vae.pth                  encoder.* decoder.*        (no prefix)
  vd-four-flow-v1-0-deprecated.pth (Nov 2022)     optimus.encoder.* ...
  the current model's full state dict             vae.text.encoder.* ...
Every key is either ours (and names the part, encoder or decoder, it fills) or ignored for a stated reason.
"""

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
