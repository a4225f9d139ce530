"""Safe, lazy access to the tensors of one checkpoint file (.safetensors, .pth or .bin).

Safetensors are memory-mapped and a tensor is only read when asked for. Pickled files go through
`torch.load(weights_only=True, mmap=True)`: nothing pickled is executed, and untouched tensors stay on disk.
Every error names the file (and the key, where there is one).
"""

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is: missing, corrupt, or not matching what we expect."""


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


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
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{self.path}: refused, it holds more than tensors ({_first_line(e)})") from None
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise CheckpointError(f"{self.path}: not a readable PyTorch checkpoint ({_first_line(e)})") from None
            # compat: files in the pre-1.6 (non-zip) format cannot be memory-mapped
            obj = torch.load(self.path, map_location="cpu", weights_only=True)
        except (EOFError, OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: not a readable PyTorch checkpoint ({_first_line(e)})") from None
        if isinstance(obj, dict) and set(obj) == {"state_dict"}:
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{self.path}: expected a dict of tensors, found {type(obj).__name__}")
        for k, v in obj.items():
            if not isinstance(v, Tensor):
                raise CheckpointError(f"{self.path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        return obj

    def keys(self) -> list[str]:
        return list(self._st.keys()) if self._st is not None else list(self._sd)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._st is not None:
            return tuple(self._st.get_slice(key).get_shape())
        return tuple(self._sd[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        if self._st is not None:
            return _ST_DTYPES.get(self._st.get_slice(key).get_dtype(), torch.float32)
        return self._sd[key].dtype

    def get(self, key: str) -> Tensor:
        if self._st is not None:
            try:
                return self._st.get_tensor(key)
            except SafetensorError as e:
                raise CheckpointError(f"{self.path}: cannot read {key!r} ({e})") from None
        return self._sd[key]

    def __repr__(self) -> str:
        return f"TensorFile({str(self.path)!r})"


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
