"""Write a checkpoint as our folder: one safetensors file per part plus config.json, atomically.

The folder is assembled under a hidden temporary name beside the target and renamed into place at the end, so
an interrupted run never leaves a partial output folder; leftovers of killed runs are swept on the next run.
"""

import glob
import json
import os
import shutil
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file

from vd.checks import DTYPES
from vd.files import PARTIAL, OutputError, describe, stale_temp, temp_path
from weights_convert.checkpoint import ALL_PARTS, config_to_json
from weights_convert.hub import download, looks_like_repo_id
from weights_convert.layouts import (FORMAT, FORMAT_VERSION, OPTIMUS_TOKENIZER, OPTIMUS_TOKENIZER_FILES,
                                     open_checkpoint)
from weights_convert.tensorfile import CheckpointError

HUB_DEFAULT = tuple(p for p in ALL_PARTS if not p.startswith("optimus."))  # every diffusers component folder


def convert(src: str | Path, out: str | Path, *, dtype: str | None = None, parts: Iterable[str] | None = None,
            kl_f8: str | Path | None = None, clip: str | Path | None = None, optimus: str | Path | None = None,
            optimus_tokenizer: str | Path | None = None, configs: dict[str, object] | None = None) -> Path:
    """Convert `src` (hub id, diffusers folder, original .pth, or a converted folder) into `out`.

    dtype: "fp16", "fp32" or "bf16" (default: keep the stored dtype). parts: write only these parts (one, or e.g.
    vd.tasks.parts_for(tasks)), opening only their files; default: every part the source has.
    The output location is checked first: `out` must not exist and its folder must be writable (OutputError
    otherwise, as for a full disk later); nothing is half-written.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise CheckpointError(f"{out}: already exists; choose a new output folder")
    wanted = None if parts is None else (parts,) if isinstance(parts, str) else tuple(parts)
    if wanted == ():
        raise ValueError("parts: expected at least one part, got none")
    unknown = [p for p in wanted or () if p not in ALL_PARTS]
    if unknown:
        raise ValueError(f"parts: unknown {unknown}; expected some of {list(ALL_PARTS)}")
    if not out.parent.is_dir():
        what = "is not a folder" if out.parent.exists() else "does not exist"
        raise OutputError(f"{out}: folder {str(out.parent)!r} {what}")
    tmp = temp_path(out)
    _sweep_partials(tmp)
    try:
        try:
            tmp.mkdir()  # before any weight is read: a read-only folder or a too-long name fails here
        except OSError as e:
            raise OutputError(f"{out}: cannot write ({describe(e)})") from None
        _write(src, out, tmp, dtype, wanted, kl_f8, clip, optimus, optimus_tokenizer, configs)
        try:
            os.replace(tmp, out)
        except OSError as e:
            if out.exists():  # another conversion to the same place finished first
                raise OutputError(f"{out}: already exists (written meanwhile by another run); choose a new "
                                  "output folder") from None
            raise OutputError(f"{out}: cannot write ({describe(e)})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write(src, out: Path, tmp: Path, dtype, wanted, kl_f8, clip, optimus, optimus_tokenizer, configs) -> None:
    if looks_like_repo_id(src):
        src = download(str(src), wanted or HUB_DEFAULT)
    ckpt = open_checkpoint(src, kl_f8=kl_f8, clip=clip, optimus=optimus, optimus_tokenizer=optimus_tokenizer,
                           configs=configs, need=wanted)
    parts = wanted or ckpt.parts
    ckpt.require(parts, "conversion")
    if "text_encoder" in parts and ckpt.tokenizer is None:  # the output could not run any text task
        raise CheckpointError(f"{ckpt.origin}: has no tokenizer folder, needed with the text encoder (an original "
                              ".pth carries none: pass --clip / clip= a diffusers-layout folder)")
    for part in parts:
        tensors = {k: t.contiguous() for k, t in ckpt.load(part, DTYPES.get(dtype)).items()}
        with _writing(out):
            save_file(tensors, tmp / f"{part}.safetensors", metadata={"format": "pt"})
        del tensors
    has_text = any(p == "text_encoder" for p in parts)
    has_optimus = any(p.startswith("optimus.") for p in parts) and ckpt.optimus_tokenizer is not None
    with _writing(out):
        if has_text and ckpt.tokenizer is not None:
            shutil.copytree(ckpt.tokenizer, tmp / "tokenizer")
        if has_optimus:
            (tmp / OPTIMUS_TOKENIZER).mkdir()
            for name in OPTIMUS_TOKENIZER_FILES:
                shutil.copy(ckpt.optimus_tokenizer / name, tmp / OPTIMUS_TOKENIZER / name)
    components = sorted({p.split(".")[0] for p in parts})
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "source": ckpt.origin, "dtype": dtype,
        "parts": list(parts), "configs": {c: config_to_json(ckpt.configs[c]) for c in components},
        "scheduler": ckpt.scheduler, "image_processor": ckpt.image_processor,
        "tokenizer": "tokenizer" if has_text and ckpt.tokenizer is not None else None,
        "optimus_tokenizer": OPTIMUS_TOKENIZER if has_optimus else None,
    }
    with _writing(out):
        (tmp / "config.json").write_text(json.dumps(meta, indent=1))


@contextmanager
def _writing(out: Path):
    """Failures to write the output (a full disk, say) as one OutputError naming it."""
    try:
        yield
    except OSError as e:
        raise OutputError(f"{out}: cannot write ({describe(e)})") from None
    except (shutil.Error, SafetensorError) as e:  # the safetensors writer reports I/O failures as its own error
        raise OutputError(f"{out}: cannot write ({str(e).splitlines()[0]})") from None


def _sweep_partials(tmp: Path) -> None:
    """Remove the temporary folders of this output that killed conversions left (vd.files.stale_temp), before
    writing to `tmp`, this run's."""
    prefix = tmp.name.rsplit(PARTIAL, 1)[0] + PARTIAL
    for stale in tmp.parent.glob(f"{glob.escape(prefix)}*"):
        if stale_temp(stale):
            shutil.rmtree(stale, ignore_errors=True)
