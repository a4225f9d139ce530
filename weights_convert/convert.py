"""Write a checkpoint as our folder: one safetensors file per part plus config.json, atomically.

The folder is assembled under a hidden temporary name beside the target and renamed into place at the end, so
an interrupted run never leaves a partial output folder; leftovers of killed runs are swept on the next run.
"""

import glob
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from weights_convert.checkpoint import config_to_json, parts_for
from weights_convert.hub import download, looks_like_repo_id
from weights_convert.layouts import (FORMAT, FORMAT_VERSION, OPTIMUS_TOKENIZER, OPTIMUS_TOKENIZER_FILES,
                                     open_checkpoint)
from weights_convert.tensorfile import CheckpointError

DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}


def convert(src: str | Path, out: str | Path, *, dtype: str | None = None, tasks: Iterable[str] | None = None,
            kl_f8: str | Path | None = None, clip: str | Path | None = None, optimus: str | Path | None = None,
            optimus_tokenizer: str | Path | None = None, configs: dict[str, object] | None = None) -> Path:
    """Convert `src` (hub id, diffusers folder, original .pth, or a converted folder) into `out`.

    dtype: "fp16", "fp32" or "bf16" (default: keep the stored dtype). tasks: write only the parts these tasks need.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists():
        raise CheckpointError(f"{out}: already exists; choose a new output folder")
    tasks = list(tasks) if tasks is not None else None
    if tasks == []:
        raise ValueError("tasks: expected at least one task, got []")
    wanted = parts_for(tasks) if tasks is not None else None
    if looks_like_repo_id(src):
        src = download(str(src), wanted or parts_for(["dual_guided"]))
    ckpt = open_checkpoint(src, kl_f8=kl_f8, clip=clip, optimus=optimus, optimus_tokenizer=optimus_tokenizer,
                           configs=configs)
    parts = wanted or ckpt.parts
    ckpt.require(parts, f"tasks {list(tasks)}" if tasks is not None else "conversion")
    if "text_encoder" in parts and ckpt.tokenizer is None:  # the output could not run any text task
        raise CheckpointError(f"{ckpt.origin}: has no tokenizer folder, needed with the text encoder (an original "
                              ".pth carries none: pass --clip / clip= a diffusers-layout folder)")

    _sweep_partials(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        for part in parts:
            tensors = {k: t.contiguous() for k, t in ckpt.load(part, DTYPES.get(dtype)).items()}
            save_file(tensors, tmp / f"{part}.safetensors", metadata={"format": "pt"})
            del tensors
        has_text = any(p == "text_encoder" for p in parts)
        if has_text and ckpt.tokenizer is not None:
            shutil.copytree(ckpt.tokenizer, tmp / "tokenizer")
        has_optimus = any(p.startswith("optimus.") for p in parts) and ckpt.optimus_tokenizer is not None
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
        (tmp / "config.json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _sweep_partials(out: Path) -> None:
    """Remove temporary folders left by killed runs (whose process is gone). One named with our own pid is
    stale too: a killed run had that pid before (pids repeat, e.g. in fresh containers)."""
    for stale in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
