"""The job file of `vd batch`: each line checked completely before anything runs.

A line is a JSON object: `task`, `seed`, an optional `id`, and the task's arguments. Every key is described
once in `KEYS` (its JSON type and a check of its value; a new job key is one entry there plus, for a task that
takes it, its name in `REQUIRED` / `OPTIONAL`). After the keys, the job as a whole is checked: seeds for all
its images, the per-call pixel budget (vd.checks.MAX_PIXELS; an unset size counts as VD's 512), and its image
files, which must lie inside the job file's folder (unless allowed elsewhere) and open as pictures (vd.images:
no decompression bomb, a mode with a meaningful RGB).
"""

import hashlib
import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vd import checks
from vd.images import open_image
from vd.sched import SCHEDULERS

COMMON = ("negative_prompt", "height", "width", "num_inference_steps", "guidance_scale", "num_images_per_prompt",
          "eta", "scheduler")
REQUIRED = {"text_to_image": ("prompt",), "image_variation": ("image",), "dual_guided": ("prompt", "image")}
OPTIONAL = {"text_to_image": COMMON, "image_variation": COMMON, "dual_guided": ("text_to_image_strength", *COMMON)}
PER_JOB = {"prompt", "image", "negative_prompt"}  # the arguments that may differ inside one batch
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
VAE_FACTOR = 8  # VD's kl-f8; the facade checks the loaded VAE's own factor again
TYPE_NAMES = {str: "a string", int: "an integer", float: "a number"}


def _id(name: str, value: str) -> str:
    if not ID.fullmatch(value):
        raise ValueError(f"{name}: expected 1-128 letters, digits, '.', '_' or '-' not starting with a symbol, "
                         f"got {value!r}")
    return value


@dataclass(frozen=True)
class Key:
    """One job key: its JSON type (float also takes integers) and a check (name, value) -> value that raises
    ValueError or TypeError with the name and the reason."""

    type: type
    check: Callable[[str, object], object] = lambda name, value: value


KEYS = {
    "task": Key(str, lambda n, v: checks.choice(n, v, list(REQUIRED))),
    "seed": Key(int, lambda n, v: checks.seed(n, v)),
    "id": Key(str, _id),
    "prompt": Key(str),
    "image": Key(str),             # an image file, relative to the job file's folder
    "negative_prompt": Key(str),   # a text; for image_variation an image file
    "text_to_image_strength": Key(float, lambda n, v: checks.number(n, v, 0.0, 1.0)),
    "height": Key(int, lambda n, v: checks.size(n, v, VAE_FACTOR)),
    "width": Key(int, lambda n, v: checks.size(n, v, VAE_FACTOR)),
    "num_inference_steps": Key(int, lambda n, v: checks.integer(n, v, 1, 1000)),
    "guidance_scale": Key(float, lambda n, v: checks.guidance(v)),
    "num_images_per_prompt": Key(int, lambda n, v: checks.integer(n, v, 1)),
    "eta": Key(float, lambda n, v: checks.eta(v)),
    "scheduler": Key(str, lambda n, v: checks.choice(n, v, list(SCHEDULERS))),
}


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

    @property
    def digest(self) -> str:
        """SHA-256 of the job's task, seed and arguments (defaults included): its records carry it, so an edited
        job is never taken for finished."""
        text = json.dumps(dict(task=self.task, seed=self.seed, arguments=self.args), sort_keys=True,
                          separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def image_keys(self) -> list[str]:
        keys = ["image", "negative_prompt"] if self.task == "image_variation" else ["image"]
        return [k for k in keys if self.args.get(k) is not None]

    def batch_key(self) -> tuple:
        shared = tuple((k, v) for k, v in sorted(self.args.items()) if k not in PER_JOB)
        return self.task, shared, self.args["negative_prompt"] is not None


def image_path(folder: Path, name: str, anywhere: bool) -> Path:
    """The file an image argument names: relative to the job file's folder, and inside it unless `anywhere`."""
    path = (folder / name).resolve()
    if not anywhere and not path.is_relative_to(folder.resolve()):
        raise ValueError(f"image {name!r} is outside the job file's folder {str(folder)!r} (pass --allow-any-path "
                         "to read it)")
    return path


def parse(text: str, line: int, folder: Path, anywhere: bool = False, opened: dict | None = None) -> Job:
    """One job line -> Job; ValueError(reason) if anything about it is wrong. `opened`: path -> reason it cannot
    be read ("" if it can), shared between lines so each file is opened once."""
    try:
        obj = json.loads(text)
    except RecursionError:
        raise ValueError("not valid JSON (nested too deeply)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    task = obj.get("task")
    if not isinstance(task, str) or task not in REQUIRED:
        raise ValueError(f"task: expected one of {list(REQUIRED)}, got {_short(task)}")
    unknown = sorted(set(obj) - {"task", "seed", "id", *REQUIRED[task], *OPTIONAL[task]})
    if unknown:
        raise ValueError(f"unknown key(s) for {task}: {', '.join(k if len(k) <= 60 else k[:57] + '...' for k in unknown)}")
    missing = [k for k in ("seed", *REQUIRED[task]) if k not in obj]
    if missing:
        raise ValueError(f"missing key(s): {', '.join(missing)}")
    for key, value in obj.items():
        want = KEYS[key].type
        if isinstance(value, bool) or not isinstance(value, (int, float) if want is float else want):
            raise ValueError(f"{key}: expected {TYPE_NAMES[want]}, got {_short(value)}")
        try:
            KEYS[key].check(key, value)
        except (ValueError, TypeError) as e:
            raise ValueError(str(e)) from None
    sig = inspect.signature(getattr(_facade(), task)).parameters
    args = {k: obj.get(k, sig[k].default) for k in (*REQUIRED[task], *OPTIONAL[task])}
    n = args["num_images_per_prompt"]
    try:
        checks.seed("seed", obj["seed"], n)
        checks.pixel_budget(n, args["height"] or 512, args["width"] or 512)
    except ValueError as e:
        raise ValueError(f"{e} (image k of a job is seeded with seed + k; split larger jobs)") from None
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    job = Job(line, obj.get("id", hashlib.sha256(canonical.encode()).hexdigest()[:12]), task, obj["seed"], args)
    opened = {} if opened is None else opened
    for key in job.image_keys():
        path = image_path(folder, args[key], anywhere)
        if path not in opened:
            try:
                open_image(path, key)
                opened[path] = ""
            except ValueError as e:
                opened[path] = str(e)
        if opened[path]:
            raise ValueError(opened[path])
    return job


def read_jobs(path: Path, anywhere: bool = False) -> tuple[list[Job], list[tuple[int, str]]]:
    """The jobs of a JSONL file, and (line number, reason) for each line that is not a valid job."""
    jobs, malformed, first_line, opened = [], [], {}, {}
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            text = raw.decode("utf-8-sig")  # -sig: a byte-order mark on line 1 is not an error
            if not text.strip():
                continue
            job = parse(text, number, path.parent, anywhere, opened)
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


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _facade():
    from vd.pipeline import VersatileDiffusion
    return VersatileDiffusion
