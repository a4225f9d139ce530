"""Fetch from the Hugging Face Hub only the files the wanted parts need (safetensors preferred; cache reused)."""

import re
from collections.abc import Iterable
from pathlib import Path

from weights_convert.layouts import WEIGHT_STEMS
from weights_convert.tensorfile import CheckpointError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(src: str | Path) -> bool:
    """`owner/name` that is not an existing local path."""
    return isinstance(src, str) and bool(_REPO_ID.match(src)) and not Path(src).exists()


def _weight_patterns(component: str, ext: str) -> list[str]:
    pats = []
    for stem in WEIGHT_STEMS:
        pats += [f"{component}/{stem}.{ext}", f"{component}/{stem}.{ext}.index.json",
                 f"{component}/{stem}-*-of-*.{ext}"]
    return pats


def download(repo_id: str, parts: Iterable[str], revision: str | None = None) -> Path:
    """Download the diffusers-layout files of `repo_id` that `parts` need; returns the local snapshot folder.
    A failure (offline, no such repo, a mistyped local path taken for a repo id) is one CheckpointError line."""
    try:
        return _download(repo_id, parts, revision)
    except Exception as e:  # the hub client raises many kinds, with multi-line messages
        text = str(e).strip()
        why = f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
        raise CheckpointError(f"{repo_id}: no such local file or folder; tried as a Hugging Face hub repo id, "
                              f"which failed ({why})") from None


def _download(repo_id: str, parts: Iterable[str], revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    wanted = {p.split(".")[0] for p in parts}
    components = sorted(wanted - {"optimus"})  # the diffusers component folders
    common = ["model_index.json", "scheduler/*.json", *(f"{c}/config.json" for c in components)]
    if "text_encoder" in components:
        common.append("tokenizer/*")
    if "image_encoder" in components:
        common.append("image_feature_extractor/*.json")
    if "optimus" in wanted:  # not a diffusers folder: the original file, kept in pretrained_pth/
        common += ["pretrained_pth/optimus-vae.pth", "pretrained_pth/optimus-vae.json", "optimus_tokenizer/*"]
    weights = [p for c in components for p in _weight_patterns(c, "safetensors")]
    root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=common + weights))
    without = [c for c in components if not any((root / c).glob("*.safetensors"))]
    if without:  # this repo (or revision) has no safetensors for these: take the .bin files
        root = Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=common + [p for c in without for p in _weight_patterns(c, "bin")]))
    return root
