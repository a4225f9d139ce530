"""Read many checkpoint tensors onto a device; safetensors bound for an accelerator stream through pinned buffers.

Why streaming: memory-mapping the files would leave every page read resident in this process, and reading each
tensor into a fresh buffer (what we did first) faults in fresh memory page by page and never overlaps reading
with copying. Here a few threads read the page cache (`os.preadv` releases the GIL) into a handful of pinned
chunks that the GPU copies from asynchronously while the next ones are read; host memory stays at
`buffers * chunk` bytes. Each tensor is handed over as soon as its last byte has been copied, so a caller that
casts (fp32 file, fp16 model) frees the wide copy at once and never holds a whole part twice.
"""

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from weights_convert.tensorfile import CheckpointError, TensorFile

CHUNK = 16 << 20  # bytes per buffer: large enough for full-speed copies, small enough to pin quickly
BUFFERS = 4


def read_tensors(items: Sequence[tuple[TensorFile, str]],
                 device: torch.device | str | None = None) -> Iterator[tuple[int, Tensor]]:
    """Yield (index into `items`, tensor on `device`) once for every (file, key). On the CPU (or device None) the
    tensors come from `TensorFile.get` in order (memory-mapped where the file allows); for any other device the
    safetensors ones are streamed (`stream_tensors`), the others read and moved one by one."""
    if device is None or torch.device(device).type == "cpu":
        for i, (file, key) in enumerate(items):
            yield i, file.get(key, device)
        return
    streamed = []
    for i, (file, key) in enumerate(items):
        if file.is_safetensors:
            streamed.append(i)
        else:
            yield i, file.get(key, device)
    for j, t in stream_tensors([items[i] for i in streamed], device):
        yield streamed[j], t


def stream_tensors(items: Sequence[tuple[TensorFile, str]], device: torch.device | str, *, chunk: int = CHUNK,
                   buffers: int = BUFFERS) -> Iterator[tuple[int, Tensor]]:
    """Yield (index into `items`, tensor on `device`) for safetensors (file, key) pairs, in file order, each as
    soon as all its bytes are on the device. Pinned buffers and asynchronous copies on CUDA; elsewhere (the CPU
    included, where this gives unmapped copies) plain buffers and synchronous copies."""
    for file, _ in items:
        if not file.is_safetensors:
            raise ValueError(f"items: {file.path} is not a safetensors file; only those can be streamed")
    if chunk < 1 or buffers < 1:
        raise ValueError(f"chunk and buffers: expected >= 1, got {chunk} and {buffers}")
    yield from _stream(items, torch.device(device), chunk, buffers)


@dataclass(frozen=True)
class _Piece:
    item: int         # index into items
    file: int         # index into the open file descriptors
    offset: int       # in the file
    size: int
    at: int           # offset in the buffer
    into: int         # offset in the item's bytes


def _plan(items, order, fds, chunk) -> tuple[list[list[_Piece]], dict[int, int]]:
    """Cut the items' byte ranges, in file order, into pieces packed into chunks of at most `chunk` bytes."""
    chunks: list[list[_Piece]] = [[]]
    used, sizes = 0, {}
    for i in order:
        file, key = items[i]
        start, end = file.span(key)
        sizes[i] = end - start
        done = 0
        while done < end - start:
            if used == chunk:
                chunks.append([])
                used = 0
            n = min(end - start - done, chunk - used)
            chunks[-1].append(_Piece(i, fds[file.path], start + done, n, used, done))
            used, done = used + n, done + n
    return [c for c in chunks if c], sizes


def _stream(items, device, chunk, buffers) -> Iterator[tuple[int, Tensor]]:
    order = sorted(range(len(items)), key=lambda i: (str(items[i][0].path), items[i][0].span(items[i][1])[0]))
    paths = list(dict.fromkeys(items[i][0].path for i in order))
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    try:
        plan, sizes = _plan(items, order, dict(zip(paths, range(len(fds)))), chunk)
        for i in order:  # empty tensors have no bytes to wait for
            if sizes[i] == 0:
                yield i, _typed(items[i], torch.empty(0, dtype=torch.uint8, device=device))
        if not plan:
            return
        cuda = device.type == "cuda"
        n_buf = min(buffers, len(plan))
        size = min(chunk, max(sum(p.size for p in c) for c in plan))
        bufs = [torch.empty(size, dtype=torch.uint8, pin_memory=cuda) for _ in range(n_buf)]
        views = [memoryview(b.numpy()) for b in bufs]
        dest: dict[int, Tensor] = {}

        def read(c: int, ready) -> None:
            if ready is not None:  # the copies out of this buffer must be done before it is overwritten
                ready.synchronize()
            for p in plan[c]:
                if os.preadv(fds[p.file], [views[c % n_buf][p.at:p.at + p.size]], p.offset) != p.size:
                    file, key = items[p.item]
                    raise CheckpointError(f"{file.path}: cannot read {key!r} (file ends early)")

        with ThreadPoolExecutor(min(n_buf, os.cpu_count() or 1), thread_name_prefix="vd-read") as pool:
            pending: dict[int, Future] = {c: pool.submit(read, c, None) for c in range(n_buf)}
            try:
                for c, pieces in enumerate(plan):
                    pending.pop(c).result()
                    buf, done = bufs[c % n_buf], []
                    for p in pieces:
                        if p.item not in dest:
                            dest[p.item] = torch.empty(sizes[p.item], dtype=torch.uint8, device=device)
                        dest[p.item][p.into:p.into + p.size].copy_(buf[p.at:p.at + p.size], non_blocking=cuda)
                        if p.into + p.size == sizes[p.item]:
                            done.append(p.item)
                    ready = None
                    if cuda:
                        ready = torch.cuda.Event()
                        ready.record(torch.cuda.current_stream(device))
                    if c + n_buf < len(plan):
                        pending[c + n_buf] = pool.submit(read, c + n_buf, ready)
                    for i in done:
                        yield i, _typed(items[i], dest.pop(i))
            finally:
                for f in pending.values():
                    f.cancel()
    finally:
        for fd in fds:
            os.close(fd)


def _typed(item: tuple[TensorFile, str], raw: Tensor) -> Tensor:
    file, key = item
    return raw.view(file.dtype(key)).reshape(file.shape(key))
