"""Array files `vd batch` reads conditions from: valid files in their less common forms read the same rows."""

import numpy as np
import torch

from vd.arrays import ArrayFiles

ROWS = np.arange(24, dtype=np.float32).reshape(3, 8)


def test_big_endian_npy_and_upper_case_suffix(tmp_path):
    with open(tmp_path / "rows.NPY", "wb") as f:  # (np.save would append ".npy")
        np.save(f, ROWS.astype(">f4"))
    got = ArrayFiles().array(tmp_path / "rows.NPY", None)
    assert got.shape == (3, 8) and got.floating and torch.equal(got.read(1), torch.from_numpy(ROWS[1:2]))


def test_legacy_pt_file(tmp_path):
    """A .pt in the pre-1.6 (non-zip) format cannot be memory-mapped; it is read whole."""
    torch.save({"ctx": torch.from_numpy(ROWS)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    got = ArrayFiles().array(tmp_path / "old.pt", "ctx")
    assert torch.equal(got.read(2), torch.from_numpy(ROWS[2:3])) and torch.equal(got.read(None), torch.from_numpy(ROWS))
