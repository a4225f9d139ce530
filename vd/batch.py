"""`vd batch JOBS.jsonl --out DIR`: a resumable batch of generations, spread over every GPU with torchrun.

Each non-blank line of JOBS.jsonl is one JSON object: `task` ("text_to_image", "image_variation" or
"dual_guided"), `seed` (an integer >= 0), an optional `id` (letters, digits, ".", "_", "-"; default: the first
12 hex digits of the SHA-256 of the line's canonical JSON) and the task's arguments: `prompt` (text_to_image,
dual_guided), `image` (image_variation, dual_guided: an image file, relative to the JSONL's folder),
`negative_prompt` (a text; for image_variation an image file), `text_to_image_strength` (dual_guided), `height`,
`width`, `num_inference_steps`, `guidance_scale`, `num_images_per_prompt`, `eta`, `scheduler`. Omitted arguments
take the facade's defaults. A line that is not such an object is reported with its number and skipped.

Image k of a job is drawn from its own CPU generator seeded with `seed + k`, whatever the batch, rank or device
count: a one-image facade call with `generator=torch.Generator().manual_seed(seed + k)` redraws it (up to float
summation order). Jobs with the same task and shared arguments go `--batch-size` to a facade call; the batches
are made from the whole file, so any number of ranks and any restart run the same calls. Under torchrun
(WORLD_SIZE > 1) the batches are dealt round-robin to the ranks, one device each (cuda:LOCAL_RANK, else the
CPU); torch.distributed only gathers the final counts. Outputs: DIR/ID-K.png and its record DIR/ID-K.json,
each written atomically (temporary file, fsync, rename; SIGTERM/SIGINT wait for the pair being written). A job
is finished when all its pairs exist, and a rerun skips it; at the end rank 0 merges the records, in job order,
into DIR/records.jsonl.
"""

import argparse
import hashlib
import inspect
import io
import json
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import PIL.Image
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from vd.pipeline import DEFAULT_REPO, VersatileDiffusion

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
COMMON = ("negative_prompt", "height", "width", "num_inference_steps", "guidance_scale", "num_images_per_prompt",
          "eta", "scheduler")
REQUIRED = {"text_to_image": ("prompt",), "image_variation": ("image",), "dual_guided": ("prompt", "image")}
OPTIONAL = {"text_to_image": COMMON, "image_variation": COMMON, "dual_guided": ("text_to_image_strength", *COMMON)}
TYPES = {"prompt": str, "image": str, "negative_prompt": str, "scheduler": str, "height": int, "width": int,
         "num_inference_steps": int, "num_images_per_prompt": int, "guidance_scale": float, "eta": float,
         "text_to_image_strength": float}
TYPE_NAMES = {str: "a string", int: "an integer", float: "a number"}
PER_JOB = {"prompt", "image", "negative_prompt"}  # the arguments that may differ inside one batch
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
PARTIAL = re.compile(r"\.(.+)\.partial-\d+")  # temporary files: .NAME.partial-PID
RECORDS = "records.jsonl"
GENERATION_ERRORS = (ValueError, TypeError, FloatingPointError, torch.cuda.OutOfMemoryError)
# ranks wait for the slowest one at the end; jobs of very different sizes can leave them far apart
COLLECTIVE_TIMEOUT = timedelta(hours=24)


@dataclass
class Job:
    """One valid line of the job file."""

    line: int
    id: str
    task: str
    seed: int
    args: dict  # the facade's keyword arguments, defaults filled in; image arguments are paths as given

    @property
    def names(self) -> list[str]:
        return [f"{self.id}-{k}" for k in range(self.args["num_images_per_prompt"])]

    def finished(self, on_disk: set[str]) -> bool:
        return all(f"{n}.png" in on_disk and f"{n}.json" in on_disk for n in self.names)

    def batch_key(self) -> tuple:
        shared = tuple((k, v) for k, v in sorted(self.args.items()) if k not in PER_JOB)
        return self.task, shared, self.args["negative_prompt"] is not None


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived; raised outside the output writes only."""


def _parse(text: str, line: int) -> Job:
    """One job line -> Job; ValueError(reason) if it is malformed."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    task = obj.get("task")
    if task not in REQUIRED:
        raise ValueError(f"task: expected one of {list(REQUIRED)}, got {task!r}")
    unknown = sorted(set(obj) - {"task", "seed", "id", *REQUIRED[task], *OPTIONAL[task]})
    if unknown:
        raise ValueError(f"unknown key(s) for {task}: {', '.join(unknown)}")
    missing = [k for k in ("seed", *REQUIRED[task]) if k not in obj]
    if missing:
        raise ValueError(f"missing key(s): {', '.join(missing)}")
    for key, value in obj.items():
        want = {"seed": int, "id": str, "task": str}.get(key) or TYPES[key]
        ok = isinstance(value, (int, float) if want is float else want) and not isinstance(value, bool)
        if not ok:
            raise ValueError(f"{key}: expected {TYPE_NAMES[want]}, got {value!r}")
    sig = inspect.signature(getattr(VersatileDiffusion, task)).parameters
    args = {k: obj.get(k, sig[k].default) for k in (*REQUIRED[task], *OPTIONAL[task])}
    n, seed = args["num_images_per_prompt"], obj["seed"]
    if n < 1:
        raise ValueError(f"num_images_per_prompt: expected an integer >= 1, got {n}")
    if not 0 <= seed <= 2**64 - n:  # torch.Generator.manual_seed takes 0 .. 2**64 - 1
        raise ValueError(f"seed: expected an integer in [0, 2**64 - num_images_per_prompt], got {seed}")
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    job_id = obj.get("id", hashlib.sha256(canonical.encode()).hexdigest()[:12])
    if not ID.fullmatch(job_id):
        raise ValueError(f"id: expected 1-128 letters, digits, '.', '_' or '-' not starting with a symbol, "
                         f"got {job_id!r}")
    return Job(line, job_id, task, seed, args)


def read_jobs(path: Path) -> tuple[list[Job], list[tuple[int, str]]]:
    """The jobs of a JSONL file, and (line number, reason) for each malformed line."""
    jobs, malformed, first_line = [], [], {}
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            text = raw.decode("utf-8-sig")  # -sig: a byte-order mark on line 1 is not an error
            if not text.strip():
                continue
            job = _parse(text, number)
            if job.id in first_line:
                raise ValueError(f"duplicate id {job.id!r} (first on line {first_line[job.id]})")
        except UnicodeDecodeError as e:
            malformed.append((number, f"not UTF-8 ({e})"))
        except ValueError as e:
            malformed.append((number, str(e)))
        else:
            first_line[job.id] = number
            jobs.append(job)
    return jobs, malformed


def make_batches(jobs: list[Job], size: int) -> list[list[Job]]:
    """Jobs that can share one facade call, at most `size` per batch, in order of their first line. The batches
    depend only on the job file and `size`, so any number of ranks, and any restart, runs the same calls."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.batch_key(), []).append(job)
    batches = [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]
    return sorted(batches, key=lambda b: b[0].line)


def _open_image(folder: Path, name: str) -> PIL.Image.Image:
    with PIL.Image.open(folder / name) as img:
        return img.convert("RGB")


def _call(pipe: VersatileDiffusion, jobs: list[tuple[Job, dict]]) -> list[list[PIL.Image.Image]]:
    """One facade call for jobs of one batch key (with their images loaded); the images of each job."""
    first = jobs[0][0]
    n = first.args["num_images_per_prompt"]
    kwargs = {k: v for k, v in first.args.items() if k not in PER_JOB}
    for key in PER_JOB & first.args.keys():
        values = [loaded.get(key, job.args[key]) for job, loaded in jobs]
        kwargs[key] = None if values[0] is None else values
    kwargs["generator"] = [torch.Generator().manual_seed(job.seed + k) for job, _ in jobs for k in range(n)]
    images = getattr(pipe, first.task)(**kwargs, progress=False).images
    return [images[i * n:(i + 1) * n] for i in range(len(jobs))]


def generate(pipe: VersatileDiffusion, batch: list[Job], folder: Path) -> list[tuple[Job, list | str]]:
    """(job, its images or why it failed) for each job of a batch."""
    results, ready = [], []
    for job in batch:
        keys = ["image", "negative_prompt"] if job.task == "image_variation" else ["image"]
        try:
            loaded = {k: _open_image(folder, job.args[k]) for k in keys if job.args.get(k) is not None}
        except (OSError, ValueError) as e:
            results.append((job, f"cannot read image: {e}"))
            continue
        ready.append((job, loaded))
    error = None
    if ready:
        try:
            results += [(job, images) for (job, _), images in zip(ready, _call(pipe, ready))]
        except GENERATION_ERRORS as e:
            error = f"{type(e).__name__}: {e}"  # retried below, once the failed call's tensors are released
    if error is not None and len(ready) == 1:
        results.append((ready[0][0], error))
    elif error is not None:  # one job can fail a whole batch: run each alone to find which
        results += [r for job, _ in ready for r in generate(pipe, [job], folder)]
    return sorted(results, key=lambda r: r[0].line)


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


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale(out: Path, names: set[str]) -> None:
    """Delete temporary files a killed run left behind for the outputs this rank owns."""
    for entry in os.scandir(out):
        m = PARTIAL.fullmatch(entry.name)
        if m and m.group(1) in names:
            Path(entry.path).unlink(missing_ok=True)


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
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """`vd batch`: 0 when every job is done, 1 when some failed or some lines are malformed, 2 on a usage error,
    128 + the signal number when stopped by SIGTERM/SIGINT."""
    args = _parser().parse_args(argv)
    if args.batch_size < 1:
        print(f"vd batch: error: --batch-size: expected an integer >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        jobs, malformed = read_jobs(args.jobs)
    except OSError as e:
        print(f"vd batch: error: cannot read {args.jobs}: {e}", file=sys.stderr)
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
    out.mkdir(parents=True, exist_ok=True)
    mine = make_batches(jobs, args.batch_size)[rank::world]
    remove_stale(out, {f"{n}.{ext}" for b in mine for j in b for n in j.names for ext in ("png", "json")}
                 | ({RECORDS} if rank == 0 else set()))
    on_disk = set(os.listdir(out))
    todo = [b for b in mine if not all(j.finished(on_disk) for j in b)]
    skipped = sum(j.finished(on_disk) for b in mine for j in b)

    def images_left(some_jobs) -> int:
        return sum(len(j.names) for j in some_jobs if not j.finished(on_disk))

    t0 = time.perf_counter()
    pipe, info = None, {}
    if todo:
        try:
            pipe = VersatileDiffusion.from_pretrained(args.model, tasks=sorted({b[0].task for b in todo}),
                                                      device=device, dtype=DTYPES.get(args.dtype),
                                                      revision=args.revision)
        except (OSError, ValueError) as e:  # a CheckpointError is a ValueError
            print(f"vd batch: rank {rank}: error: cannot load {args.model!r}: {e}", file=sys.stderr)
            return 2
        info = dict(model=args.model, model_revision=model_revision(args.model, args.revision),
                    dtype=str(pipe.dtype).removeprefix("torch."), device=device.type)
    t1 = time.perf_counter()
    progress = Progress(out, images_left(jobs if rank == 0 else [j for b in todo for j in b]), rank, world,
                        args.no_progress)
    done = images = 0
    failed: list[tuple[int, str, str]] = []
    every = None
    try:
        for batch in todo:
            for job, result in generate(pipe, batch, args.jobs.parent):
                if isinstance(result, str):
                    failed.append((job.line, job.id, result))
                    continue
                with signals.writing():
                    for k, (name, img) in enumerate(zip(job.names, result)):
                        _save(out, name, img, job, k, info)
                images += len(result)
                done += not job.finished(on_disk)  # a finished job in an unfinished batch is redone, not counted
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
    return 1 if failed or malformed else 0


def _save(out: Path, name: str, img: PIL.Image.Image, job: Job, k: int, info: dict) -> None:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_atomic(out / f"{name}.png", buf.getvalue())
    record = dict(id=job.id, image=f"{name}.png", index=k, line=job.line, task=job.task, seed=job.seed,
                  image_seed=job.seed + k, arguments=job.args, **info,
                  time=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_atomic(out / f"{name}.json", (json.dumps(record, ensure_ascii=False) + "\n").encode())


def _merge_records(out: Path, jobs: list[Job]) -> None:
    lines = []
    for job in jobs:
        for name in job.names:
            try:
                lines.append(json.dumps(json.loads((out / f"{name}.json").read_text()), ensure_ascii=False))
            except FileNotFoundError:
                pass
    write_atomic(out / RECORDS, "".join(line + "\n" for line in lines).encode())


def _summary(args, jobs: list[Job], malformed: list[tuple[int, str]], every: list[dict],
             failed: list[tuple[int, str, str]], world: int) -> None:
    done, skipped, images = (sum(c[k] for c in every) for k in ("done", "skipped", "images"))
    seconds = max(c["seconds"] for c in every)
    print(f"vd batch: {len(jobs)} jobs: {done} done, {skipped} skipped (already in {args.out}), {len(failed)} "
          f"failed; {len(malformed)} malformed line(s)")
    rate = f"{images / seconds:.2f} images/s" if seconds > 0 and images else "no images generated"
    print(f"  {images} images in {seconds:.1f} s on {world} rank(s): {rate} (after loading the model in "
          f"{max(c['load'] for c in every):.1f} s)")
    for line, job_id, reason in failed:
        print(f"  failed: line {line} (id {job_id}): {reason}")
    for line, reason in malformed:
        print(f"  malformed: line {line}: {reason}")
