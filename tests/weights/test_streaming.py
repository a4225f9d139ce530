"""Streaming safetensors to a device (weights_convert.streaming): the bytes arrive intact whatever the chunking,
every tensor exactly once, and failures name the file and key without leaking file descriptors."""

import os

import pytest
import torch
from safetensors.torch import save_file

from weights_convert.streaming import read_tensors, stream_tensors
from weights_convert.tensorfile import CheckpointError, TensorFile


@pytest.fixture
def files(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = {"big": torch.randn(37, 41, generator=g), "half": torch.randn(3, 5, generator=g).half(),
         "ints": torch.arange(7), "empty": torch.zeros(0, 4), "flags": torch.rand(9, generator=g) > 0.5,
         "bf": torch.randn(2, 2, 2, generator=g).bfloat16(), "scalar": torch.tensor(2.5)}
    b = {"w": torch.randn(300, generator=g), "v": torch.randn(4, 4, generator=g).double()}
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    return {TensorFile(tmp_path / "a.safetensors"): a, TensorFile(tmp_path / "b.safetensors"): b}


def _items(files):
    return [(f, k) for f, tensors in files.items() for k in reversed(list(tensors))]  # not in file order


@pytest.mark.parametrize(("chunk", "buffers"), [(1, 1), (7, 2), (100, 3), (1 << 20, 4)])
def test_streamed_tensors_equal_the_files(files, chunk, buffers):
    items = _items(files)
    got = list(stream_tensors(items, "cpu", chunk=chunk, buffers=buffers))
    assert sorted(i for i, _ in got) == list(range(len(items)))
    for i, t in got:
        file, key = items[i]
        want = files[file][key]
        assert t.dtype == want.dtype and t.shape == want.shape and torch.equal(t, want), key


def test_read_tensors_mixes_streamed_and_pickled_files(files, tmp_path):
    """On a non-CPU device safetensors stream and a .pth is read and moved; indices refer to the request."""
    torch.save({"p": torch.randn(6, 2)}, tmp_path / "c.pth")
    items = _items(files) + [(TensorFile(tmp_path / "c.pth"), "p")]
    got = dict(read_tensors(items, "meta"))
    assert sorted(got) == list(range(len(items)))
    for i, (file, key) in enumerate(items):
        assert got[i].is_meta and got[i].shape == file.shape(key) and got[i].dtype == file.dtype(key)


def test_a_file_cut_after_opening_is_an_error_naming_file_and_key(files):
    file = next(f for f in files if f.path.name == "b.safetensors")
    start, _ = file.span("v")
    os.truncate(file.path, start + 5)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(CheckpointError, match=r"b\.safetensors: cannot read 'v' \(file ends early\)"):
        list(stream_tensors([(file, "w"), (file, "v")], "cpu", chunk=64))
    assert len(os.listdir("/proc/self/fd")) == before


def test_an_abandoned_stream_closes_its_files(files):
    before = len(os.listdir("/proc/self/fd"))
    stream = stream_tensors(_items(files), "cpu", chunk=8)
    next(stream)
    stream.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_only_safetensors_stream(tmp_path):
    torch.save({"p": torch.zeros(2)}, tmp_path / "c.pth")
    with pytest.raises(ValueError, match=r"items: .*c\.pth is not a safetensors file"):
        next(stream_tensors([(TensorFile(tmp_path / "c.pth"), "p")], "cpu"))
    with pytest.raises(ValueError, match="chunk and buffers: expected >= 1, got 0 and 4"):
        next(stream_tensors([], "cpu", chunk=0))
