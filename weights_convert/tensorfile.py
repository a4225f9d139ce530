"""Safe, lazy access to the tensors of one checkpoint file (.safetensors, .pth or .bin).

Safetensors are memory-mapped and a tensor is only read when asked for (or streamed to an accelerator, see
`weights_convert.streaming`). Pickled files go through
`torch.load(weights_only=True, mmap=True)`: nothing pickled is executed, and untouched tensors stay on disk.
Every error names the file (and the key, where there is one).
"""

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is: missing, corrupt, or not matching what we expect."""


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2": torch.float8_e5m2,
              "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "C64": torch.complex64, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
              "U8": torch.uint8, "BOOL": torch.bool}


class TensorFile:
    """The tensors of one file: names, shapes and dtypes without reading data, and tensors on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        if self.path.suffix == ".safetensors":
            self._st, self._sd = self._open_safetensors(), None
        else:
            self._st, self._sd = None, self._open_pickle()

    def _open_safetensors(self):
        try:  # this also refuses a truncated file ("file not fully covered")
            return safe_open(str(self.path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({e})") from None

    def _open_pickle(self) -> dict[str, Tensor]:
        try:
            obj = self._torch_load(mmap=True)
        except _NotZip:  # compat: files in the pre-1.6 (non-zip) format cannot be memory-mapped
            obj = self._torch_load(mmap=False)
        if isinstance(obj, dict) and set(obj) == {"state_dict"}:
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{self.path}: expected a dict of tensors, found {type(obj).__name__}")
        for k, v in obj.items():
            if not isinstance(v, Tensor):
                raise CheckpointError(f"{self.path}: entry {k!r} is of type {type(v).__name__}, not a tensor")
        return obj

    def _torch_load(self, mmap: bool):
        """torch.load restricted to tensors and plain containers; every failure becomes a CheckpointError."""
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            # the weights-only unpickler stops at the first global it does not allow: nothing was imported or run
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            if found:
                raise CheckpointError(f"{self.path}: refused, it holds more than tensors (it asks for "
                                      f"{found.group(1)}; nothing in it was run)") from None
            raise CheckpointError(f"{self.path}: not a readable PyTorch checkpoint ({_reason(e)})") from None
        except RuntimeError as e:
            if mmap and "mmap" in str(e):
                raise _NotZip from None
            raise CheckpointError(f"{self.path}: not a readable PyTorch checkpoint ({_first_line(e)})") from None
        except Exception as e:  # a damaged pickle stream fails in many ways (EOFError, IndexError, KeyError, ...)
            raise CheckpointError(f"{self.path}: not a readable PyTorch checkpoint ({_first_line(e)})") from None

    def keys(self) -> list[str]:
        return list(self._st.keys()) if self._st is not None else list(self._sd)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._st is not None:
            return tuple(self._st.get_slice(key).get_shape())
        return tuple(self._sd[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        if self._st is not None:
            name = self._st.get_slice(key).get_dtype()
            if name not in _ST_DTYPES:
                raise CheckpointError(f"{self.path}: {key!r} has dtype {name}, which torch cannot hold")
            return _ST_DTYPES[name]
        return self._sd[key].dtype

    @property
    def is_safetensors(self) -> bool:
        return self._st is not None

    def get(self, key: str, device: torch.device | str | None = None) -> Tensor:
        """The tensor on `device` (default the CPU, memory-mapped where the file allows). Safetensors bound for
        another device are read, not mapped (`weights_convert.streaming`: no mapped pages stay resident)."""
        if self._st is not None and device is not None and torch.device(device).type != "cpu":
            from weights_convert.streaming import read_tensors
            return next(read_tensors([(self, key)], device))[1]
        if self._st is None:
            t = self._sd[key]
        else:
            try:
                t = self._st.get_tensor(key)
            except SafetensorError as e:
                raise CheckpointError(f"{self.path}: cannot read {key!r} ({e})") from None
        return t if device is None else t.to(device)

    def span(self, key: str) -> tuple[int, int]:
        """Where a safetensors tensor's bytes are in the file: [start, end)."""
        if not hasattr(self, "_spans"):
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            self._spans = {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
                           for k, v in header.items() if k != "__metadata__"}
        return self._spans[key]

    def __repr__(self) -> str:
        return f"TensorFile({str(self.path)!r})"


class _NotZip(Exception):
    """torch.load(mmap=True) met a file in the legacy (non-zip) format."""


def _reason(e: BaseException) -> str:
    """The informative line of a weights-only unpickler error (its first lines are generic advice)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "Unsupported" in ln:
            return ln
    return lines[0] if lines else type(e).__name__


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
