"""`vd batch JOBS.jsonl --out DIR`: a resumable batch of generations, spread over every GPU with torchrun.

Each non-blank line of JOBS.jsonl is one JSON object: `task` (a flow of the facade: "text_to_image",
"image_variation", "dual_guided", "blend", "image_to_text" or "text_variation"), `seed` (an integer >= 0), an
optional `id` (letters, digits, ".", "_", "-"; default: the first 12 hex digits of the SHA-256 of the line's
canonical JSON) and the task's arguments (vd.jobs.KEYS; `scheduler_config` sets the samplers' settings for the
job): files are paths relative to the JSONL's folder, and tensor arguments rows of array files (vd.arrays).
Omitted arguments take the facade's defaults. Every line is checked completely before anything runs (types,
ranges, seeds, the pixel budget, its image and array files: inside the JSONL's folder unless --allow-any-path,
readable, with the key, row and rank asked for); a line that fails is reported with its number and skipped.
Any error while running a job (out of memory, or a size the model refuses, included) is that job's failure,
reported with its line, and the run goes on.

Output k of a job is drawn from its own CPU generator seeded with `seed + k`, whatever the batch, rank or device
count: a one-output facade call with `generator=torch.Generator().manual_seed(seed + k)` redraws it (up to float
summation order). Jobs of the three first flows using only their plain keys (vd.jobs.BATCH_KEYS) with the same
task and shared arguments go `--batch-size` to a facade call; every other job runs alone, one facade call per
output, which is then exactly that one-output call. The batches are made from the whole file, so any number of
ranks and any restart run the same calls. Under torchrun (WORLD_SIZE > 1) the batches are dealt round-robin to
the ranks, one device each (cuda:LOCAL_RANK, else the CPU); torch.distributed only gathers the final counts.
Outputs: DIR/ID-K.png (a text flow's: DIR/ID-K.txt, one sentence; with "output_type": "latent", DIR/ID-K.npy, the
latents [1, 4, h, w], or a text flow's [1, 768]) and its record DIR/ID-K.json, each written atomically (temporary
file, fsync, rename; SIGTERM/SIGINT wait for the pair being written). The record carries the SHA-256 of the job's
task, seed and arguments (and of its array files' sizes and mtimes): an output is finished when its file exists and
its record reads and matches the job, so a damaged record, an edited job or a rewritten array file is made again on
a rerun. At the end rank 0 merges the records, in job order, into DIR/records.jsonl. Runs sharing DIR (concurrent,
or the ranks of other nodes) leave each other's temporary files alone.
"""

import argparse
import hashlib
import io
import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import PIL.Image
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from vd import checks, files
from vd.arrays import npy_bytes
from vd.fast import EAGER
from vd.files import OutputError
from vd.jobs import PER_JOB, SCHEDULER_SETTINGS, TEXT_TASKS, Job, read_jobs
from vd.pipeline import DEFAULT_REPO, VersatileDiffusion
from vd.versions import versions

RECORDS = "records.jsonl"
# ranks wait for the slowest one at the end; jobs of very different sizes can leave them far apart
COLLECTIVE_TIMEOUT = timedelta(hours=24)
__all__ = ["main", "make_batches", "read_jobs", "Job"]


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived; raised outside the output writes only."""


def make_batches(jobs: list[Job], size: int) -> list[list[Job]]:
    """Jobs that can share one facade call, at most `size` per batch and within the facade's pixel budget per call
    (jobs of one batch key make outputs of one size), in order of their first line. The batches depend only on
    the job file and `size`, so any number of ranks, and any restart, runs the same calls."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.batch_key(), []).append(job)
    batches = []
    for g in groups.values():
        per = max(1, min(size, checks.MAX_PIXELS // max(1, g[0].pixels)))
        batches += [g[i:i + per] for i in range(0, len(g), per)]
    return sorted(batches, key=lambda b: b[0].line)


def _call(pipe: VersatileDiffusion, jobs: list[tuple[Job, dict]]) -> list[list]:
    """One facade call for jobs of one batch key (with their files read); the outputs of each job."""
    first = jobs[0][0]
    if first.alone:
        return [_alone(pipe, first, jobs[0][1])]
    n = first.args["num_images_per_prompt"]
    kwargs = {k: v for k, v in first.args.items() if k not in PER_JOB}
    for key in PER_JOB & first.args.keys():
        values = [loaded.get(key, job.args[key]) for job, loaded in jobs]
        kwargs[key] = None if values[0] is None else values
    kwargs["generator"] = [torch.Generator().manual_seed(job.seed + k) for job, _ in jobs for k in range(n)]
    images = getattr(pipe, first.task)(**kwargs, progress=False).images
    return [images[i * n:(i + 1) * n] for i in range(len(jobs))]


def _alone(pipe: VersatileDiffusion, job: Job, loaded: dict) -> list[PIL.Image.Image | str | torch.Tensor]:
    """A job that runs on its own: one facade call per output k, seeded seed + k, with row k of its `latents`
    (and of its `init_latents` when it has one row per output), under its scheduler settings if it has some."""
    kwargs, n, outputs = {**job.args, **loaded, job.count_key: 1}, job.args[job.count_key], []
    settings, saved = kwargs.pop(SCHEDULER_SETTINGS, None), pipe.scheduler_config
    if job.task in TEXT_TASKS:
        kwargs.pop("output_type", None)  # the text flows return both the sentences and their latents
    try:
        if settings is not None:
            pipe.scheduler_config = {**saved, **settings}
        for k in range(n):
            kw = dict(kwargs, generator=torch.Generator().manual_seed(job.seed + k), progress=False)
            for key in ("latents", "init_latents"):
                if kw.get(key) is not None and len(kw[key]) == n:
                    kw[key] = kw[key][k:k + 1]
            out = getattr(pipe, job.task)(**kw)
            if job.task in TEXT_TASKS:
                outputs.append(out.texts[0] if job.suffix == ".txt" else out.latents[0])
            else:
                outputs.append(out.images[0])
    finally:
        if settings is not None:
            pipe.scheduler_config = saved
    return outputs


def generate(pipe: VersatileDiffusion, batch: list[Job], folder: Path,
             anywhere: bool = False) -> list[tuple[Job, list | str]]:
    """(job, its images or why it failed) for each job of a batch. Any exception a job raises (a bad argument,
    an out-of-memory error of any device, a recursion or decoder error) is that job's failure; SIGTERM/SIGINT
    (Interrupted) and KeyboardInterrupt still stop the run."""
    results, ready = [], []
    for job in batch:
        try:
            ready.append((job, job.inputs(folder, anywhere)))
        except Exception as e:  # the file changed since the job file was checked
            results.append((job, f"cannot read input: {_reason(e)}"))
    return sorted(results + _outputs(pipe, ready), key=lambda r: r[0].line)


def _outputs(pipe: VersatileDiffusion, ready: list[tuple[Job, dict]]) -> list[tuple[Job, list | str]]:
    """(job, its outputs or why it failed) for jobs with their files read; a failed batch is run again one job at
    a time, with the same files, to find which job failed."""
    if not ready:
        return []
    try:
        return [(job, outputs) for (job, _), outputs in zip(ready, _call(pipe, ready))]
    except Interrupted:
        raise
    except Exception as e:
        error = _reason(e)  # retried below, once the failed call's tensors are released
    if len(ready) == 1:
        return [(ready[0][0], error)]
    return [r for one in ready for r in _outputs(pipe, [one])]


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


class Signals:
    """Turns SIGTERM/SIGINT into Interrupted, held back while `writing()` so no output is left half-done."""

    def __init__(self):
        self.busy, self.pending, self.previous = False, None, {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.busy:
            self.pending = signum
        else:
            raise Interrupted(signum)

    @contextmanager
    def writing(self):
        self.busy = True
        try:
            yield
        finally:
            self.busy = False
            if self.pending is not None:
                raise Interrupted(self.pending)


def remove_stale(out: Path) -> None:
    """Delete the temporary files that killed runs left behind (vd.files.stale_temp); those of live runs, here or
    on other nodes, are left alone, so runs can share the folder."""
    for entry in os.scandir(out):
        if files.stale_temp(Path(entry.path)):
            Path(entry.path).unlink(missing_ok=True)


def finished_names(out: Path, jobs: list[Job]) -> set[str]:
    """The outputs ID-K of these jobs that are done: the image (or text) exists and its record reads and carries
    the job's digest. A damaged record, or one of an edited job, leaves its output to be made again."""
    on_disk, done = set(os.listdir(out)), set()
    for job in jobs:
        digest = job.digest
        for name in job.names:
            if {f"{name}{job.suffix}", f"{name}.json"} <= on_disk and _record(out, name, digest) is not None:
                done.add(name)
    return done


def _record(out: Path, name: str, digest: str) -> dict | None:
    try:
        record = json.loads((out / f"{name}.json").read_bytes())
    except (OSError, ValueError, RecursionError):  # ValueError: not UTF-8 or not JSON
        return None
    return record if isinstance(record, dict) and record.get("job_sha256") == digest else None


def model_revision(model: str, revision: str | None) -> str | None:
    """The hub snapshot's commit, or a short hash of a local folder's JSON configs (of a file's size and head)."""
    path = Path(model)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted([*path.glob("*.json"), *path.glob("*/*.json")]):
            h.update(f.relative_to(path).as_posix().encode() + b"\0" + f.read_bytes())
        return "sha256:" + h.hexdigest()[:12]
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(1 << 20)
        return "sha256:" + hashlib.sha256(str(path.stat().st_size).encode() + head).hexdigest()[:12]
    try:  # a hub repo id, already downloaded by from_pretrained
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(model, revision=revision, allow_patterns=["model_index.json"])).name
    except Exception:  # best effort: the records then carry the revision asked for
        return revision


def run_info(dtype: torch.dtype, device: torch.device) -> dict:
    """What every record of a run says its outputs' last bits depend on (README: reproducible results): the dtype,
    the device and the software, and the GPU's model, or on the CPU the thread count that its kernels' sums are
    split over."""
    info = dict(dtype=str(dtype).removeprefix("torch."), device=device.type, versions=versions())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        info["cpu_threads"] = torch.get_num_threads()
    return info


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vd batch", description="Run a JSONL file of generation jobs, resumably; "
                                "under torchrun --nproc-per-node K, over K devices.",
                                epilog='a job line: {"task": "text_to_image", "prompt": "a red fox", "seed": 7, '
                                '"num_images_per_prompt": 2}')
    p.add_argument("jobs", type=Path, help="JSONL file, one job per line (see the vd.batch module docstring)")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder (created if missing)")
    p.add_argument("--model", default=DEFAULT_REPO, help="hub repo id, diffusers-layout folder, original .pth, or "
                   "converted folder")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--batch-size", type=int, default=1, help="jobs per facade call, among jobs of the same task "
                   "and shape (default 1)")
    p.add_argument("--dtype", choices=sorted(checks.DTYPES), default=None, help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--allow-any-path", action="store_true", help="let file paths point outside the job file's "
                   "folder (default: refused)")
    p.add_argument("--eager", action="store_true", help="on CUDA, plain PyTorch: no CUDA graphs and no Triton "
                   "kernels (slower; for debugging)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """`vd batch`: 0 when every job is done, 1 when some job failed or some line is malformed (the others ran),
    2 on a usage error (bad options, unreadable job file, an output folder that cannot be written, a model that
    cannot be loaded), 128 + the signal number when stopped by SIGTERM/SIGINT."""
    args = _parser().parse_args(argv)
    if args.batch_size < 1:
        print(f"vd batch: error: --batch-size: expected an integer >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        jobs, malformed = read_jobs(args.jobs, anywhere=args.allow_any_path)
    except OSError as e:
        print(f"vd batch: error: cannot read {args.jobs}: {files.describe(e)}", file=sys.stderr)
        return 2
    try:
        _prepare_out(args.out)
    except OutputError as e:
        print(f"vd batch: error: --out: {e}", file=sys.stderr)
        return 2
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if rank == 0:
        for line, reason in malformed:
            print(f"vd batch: {args.jobs}:{line}: skipped: {reason}", file=sys.stderr)
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    signals = Signals()
    signals.install()
    try:
        return _run(args, jobs, malformed, rank, world, device, signals)
    except OutputError as e:  # a full disk, say: every later job would fail the same way
        print(f"vd batch: rank {rank}: error: {e}; finished outputs are kept, run again to resume", file=sys.stderr)
        return 2
    except Interrupted as e:
        name = signal.Signals(e.args[0]).name
        print(f"vd batch: rank {rank}: stopped by {name}; finished outputs are kept, run again to resume",
              file=sys.stderr)
        return 128 + e.args[0]
    finally:
        signals.restore()
        if dist.is_initialized():
            dist.destroy_process_group()


class Progress:
    """A bar per rank, in images. With several ranks, rank 0's bar counts instead the records that all ranks have
    written to the (shared) output folder, looked up at most every 2 s."""

    def __init__(self, out: Path, total: int, rank: int, world: int, disable: bool):
        self.out, self.every_rank = out, rank == 0 and world > 1 and not disable
        self.bar = tqdm(total=total, desc=f"all {world} ranks" if self.every_rank else f"rank {rank}", unit="image",
                        position=int(os.environ.get("LOCAL_RANK", 0)), disable=disable)
        self.start, self.last = (self._records() if self.every_rank else 0), time.monotonic()

    def _records(self) -> int:
        return sum(e.name.endswith(".json") for e in os.scandir(self.out))

    def advance(self, images: int) -> None:
        if not self.every_rank:
            self.bar.update(images)
        elif time.monotonic() - self.last > 2:
            self.last = time.monotonic()
            self.bar.update(min(self._records() - self.start, self.bar.total) - self.bar.n)

    def close(self, all_through: bool) -> None:
        if all_through and self.every_rank:
            self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()


def _run(args, jobs: list[Job], malformed: list[tuple[int, str]], rank: int, world: int, device: torch.device,
         signals: Signals) -> int:
    out: Path = args.out
    mine = make_batches(jobs, args.batch_size)[rank::world]
    remove_stale(out)
    done_names = finished_names(out, jobs if rank == 0 else [j for b in mine for j in b])

    def finished(job: Job) -> bool:
        return all(n in done_names for n in job.names)

    todo = [b for b in mine if not all(finished(j) for j in b)]
    skipped = sum(finished(j) for b in mine for j in b)

    def images_left(some_jobs) -> int:
        return sum(len(j.names) for j in some_jobs if not finished(j))

    t0 = time.perf_counter()
    pipe, info = None, {}
    if todo:
        try:
            pipe = VersatileDiffusion.from_pretrained(args.model, tasks=sorted({b[0].task for b in todo}),
                                                      device=device, dtype=checks.DTYPES.get(args.dtype),
                                                      revision=args.revision, **(EAGER if args.eager else {}))
        except (OSError, ValueError) as e:  # a CheckpointError is a ValueError
            print(f"vd batch: rank {rank}: error: cannot load {args.model!r}: {e}", file=sys.stderr)
            return 2
        info = dict(model=args.model, model_revision=model_revision(args.model, args.revision),
                    **run_info(pipe.dtype, device))
    t1 = time.perf_counter()
    progress = Progress(out, images_left(jobs if rank == 0 else [j for b in todo for j in b]), rank, world,
                        args.no_progress)
    done = images = 0
    failed: list[tuple[int, str, str]] = []
    every = None
    try:
        for batch in todo:
            for job, result in generate(pipe, batch, args.jobs.parent, args.allow_any_path):
                if isinstance(result, str):
                    failed.append((job.line, job.id, result))
                    continue
                with signals.writing():
                    for k, (name, output) in enumerate(zip(job.names, result)):
                        _save(out, name, output, job, k, info)
                images += len(result)
                done += not finished(job)  # a finished job in an unfinished batch is redone, not counted
            progress.advance(images_left(batch))
        counts = dict(done=done, skipped=skipped, images=images, seconds=time.perf_counter() - t1, load=t1 - t0,
                      failed=failed)
        every = [counts]
        if world > 1:
            every = [None] * world
            dist.all_gather_object(every, counts)
    finally:
        progress.close(all_through=every is not None)
    failed = sorted(f for c in every for f in c["failed"])
    if rank == 0:
        _merge_records(out, jobs)
        _summary(args, jobs, malformed, every, failed, world)
    if world > 1:  # no rank tears down before rank 0 has written everything: a rank aborting in its teardown
        dist.barrier()  # (seen once, SIGABRT inside gloo) makes torchrun stop the others, rank 0 mid-merge too
    return 1 if failed or malformed else 0


def _save(out: Path, name: str, output: PIL.Image.Image | str | torch.Tensor, job: Job, k: int, info: dict) -> None:
    """The output (a PNG, a text file of one line, or latents [4, h, w] or a text flow's [768] as a float32 .npy
    file of one row, which a job can name again as its `latents` or `init_latents`), then its record."""
    if isinstance(output, str):
        files.write_bytes(out / f"{name}.txt", (output + "\n").encode())
        what = dict(text=f"{name}.txt", sentence=output)
    elif isinstance(output, torch.Tensor):
        files.write_bytes(out / f"{name}.npy", npy_bytes(output))
        what = dict(latents=f"{name}.npy")
    else:
        buf = io.BytesIO()
        output.save(buf, format="PNG")
        files.write_bytes(out / f"{name}.png", buf.getvalue())
        what = dict(image=f"{name}.png")
    record = dict(id=job.id, **what, index=k, line=job.line, task=job.task, seed=job.seed, image_seed=job.seed + k,
                  arguments=job.args, job_sha256=job.digest, **info,
                  time=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    files.write_bytes(out / f"{name}.json", (json.dumps(record, ensure_ascii=False) + "\n").encode())


def _merge_records(out: Path, jobs: list[Job]) -> None:
    """The records of the current jobs, in job order; unreadable ones and those of edited jobs are left out (their
    images are made again on the next run)."""
    lines = []
    for job in jobs:
        digest = job.digest
        for name in job.names:
            record = _record(out, name, digest)
            if record is not None:
                lines.append(json.dumps(record, ensure_ascii=False))
    files.write_bytes(out / RECORDS, "".join(line + "\n" for line in lines).encode())


def _prepare_out(out: Path) -> None:
    """Create the output folder and make sure it can be written, before any model is loaded."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{out}: is a file, not a folder") from None
    except OSError as e:
        raise OutputError(f"{out}: cannot create the folder ({files.describe(e)})") from None
    files.check_writable(out / RECORDS)


def _summary(args, jobs: list[Job], malformed: list[tuple[int, str]], every: list[dict],
             failed: list[tuple[int, str, str]], world: int) -> None:
    done, skipped, images = (sum(c[k] for c in every) for k in ("done", "skipped", "images"))
    seconds = max(c["seconds"] for c in every)
    print(f"vd batch: {len(jobs)} jobs: {done} done, {skipped} skipped (already in {args.out}), {len(failed)} "
          f"failed; {len(malformed)} malformed line(s)")
    rate = f"{images / seconds:.2f} outputs/s" if seconds > 0 and images else "nothing generated"
    print(f"  {images} outputs in {seconds:.1f} s on {world} rank(s): {rate} (after loading the model in "
          f"{max(c['load'] for c in every):.1f} s)")
    for line, job_id, reason in failed:
        print(f"  failed: line {line} (id {job_id}): {reason}")
    for line, reason in malformed:
        print(f"  malformed: line {line}: {reason}")
