"""Conditions read from array files, for `vd batch`: `{"file": "pred_text.npy", "index": 12}` is row 12 of the
array, kept as a batch of one ([1, 77, D], what the facade takes); without "index", the whole array. A `.npy`
holds one array; a `.pt` a tensor or a dict of tensors (then "key" names one); a `.safetensors` file always
needs "key". Files are opened lazily (memory-mapped) and once per `ArrayFiles`; only the rows used are read.
Nothing pickled is executed (`np.load(allow_pickle=False)`, `torch.load(weights_only=True)`). `npy_bytes` writes
the outputs of `"output_type": "latent"` in the form a job reads back.
"""

import io
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SUFFIXES = (".npy", ".pt", ".safetensors")


def npy_bytes(latents: Tensor) -> bytes:
    """One output's latents ([C, h, w], or a text flow's [768]) as a float32 .npy file of one row, [1, ...]: the
    batch of one that the flows' `latents=`/`init_latents=` take (and `{"file": ...}` reads back)."""
    return npy_rows(latents[None])


def npy_rows(rows: Tensor) -> bytes:
    """A batch of latents, as it is, as a float32 .npy file."""
    buf = io.BytesIO()
    np.save(buf, rows.detach().float().cpu().numpy())
    return buf.getvalue()


class _Array:
    """One array of a file: its shape, whether it holds floats, and rows read on demand."""

    def __init__(self, shape, floating: bool, rows):
        self.shape, self.floating, self._rows = tuple(int(s) for s in shape), floating, rows

    def read(self, index: int | None) -> Tensor:
        """Row `index` as [1, ...] (or the whole array), as a float32 tensor of its own (not the file's memory)."""
        return self._rows(slice(None) if index is None else slice(index, index + 1)).float().clone()


class ArrayFiles:
    """The array files of one run, each opened once. `array(path, key)` raises ValueError(reason)."""

    def __init__(self):
        self._files: dict[Path, object] = {}  # path -> opened file, or the ValueError it raised

    def array(self, path: Path, key: str | None) -> _Array:
        if path not in self._files:
            try:
                self._files[path] = _open(path)
            except ValueError as e:
                self._files[path] = e
        f = self._files[path]
        if isinstance(f, ValueError):
            raise ValueError(str(f))
        return _select(f, path, key)

    @staticmethod
    def stamp(path: Path) -> list[int]:
        """[size, mtime in ns]: a job's digest carries it, so an array file rewritten in place redoes its jobs."""
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]


def _open(path: Path) -> object:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path.name!r}: expected a {', '.join(SUFFIXES)} file")
    try:
        if suffix == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False)
        if suffix == ".pt":
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # the legacy (pre-1.6, non-zip) format cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
        from safetensors import safe_open
        return safe_open(str(path), framework="pt")
    except Exception as e:  # OSError, a damaged file, a pickle holding more than tensors
        text = " ".join(str(e).split())[:200]
        raise ValueError(f"cannot read array file {str(path)!r} ({type(e).__name__}: {text})") from None


def _select(f: object, path: Path, key: str | None) -> _Array:
    name = path.name
    if isinstance(f, np.ndarray):
        if key is not None:
            raise ValueError(f"{name!r} is a .npy file, which holds one array: give no \"key\"")
        native = f.dtype.newbyteorder("=")  # torch reads native byte order only (a big-endian .npy is valid)
        return _Array(f.shape, f.dtype.kind == "f", lambda s: torch.from_numpy(np.array(f[s], dtype=native)))
    if isinstance(f, Tensor):
        if key is not None:
            raise ValueError(f"{name!r} holds one tensor, not a dict: give no \"key\"")
        return _Array(f.shape, f.is_floating_point(), lambda s: f[s])
    if isinstance(f, dict):
        tensors = sorted(k for k, v in f.items() if isinstance(v, Tensor))
        if key not in tensors:
            raise ValueError(f"{name!r}: expected \"key\" naming one of its tensors {_few(tensors)}, got {key!r}")
        t = f[key]
        return _Array(t.shape, t.is_floating_point(), lambda s: t[s])
    if hasattr(f, "get_slice"):  # a safetensors file
        keys = sorted(f.keys())
        if key not in keys:
            raise ValueError(f"{name!r}: expected \"key\" naming one of its tensors {_few(keys)}, got {key!r}")
        sl = f.get_slice(key)
        dtype = sl.get_dtype()
        return _Array(sl.get_shape(), dtype.startswith(("F", "BF")), lambda s: sl[s])
    raise ValueError(f"{name!r}: expected a tensor or a dict of tensors, got {type(f).__name__}")


def _few(names: list[str]) -> str:
    return repr(names) if len(names) <= 8 else repr(names[:8])[:-1] + ", ...]"
