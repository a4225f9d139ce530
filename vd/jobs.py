"""The job file of `vd batch`: each line checked completely before anything runs.

A line is a JSON object: `task`, `seed`, an optional `id`, and the task's arguments. Every key is described
once in `KEYS` (its JSON type and a check of its value; a new job key is one entry there plus, for a task that
takes it, its name in `REQUIRED` / `OPTIONAL`). After the keys, the job as a whole is checked: one of each
required pair (`prompt` or `prompt_embeds`, ...), seeds for all its outputs, the per-call pixel budget
(vd.checks.MAX_PIXELS; an unset size counts as VD's 512), its image files, which must lie inside the job file's
folder (unless allowed elsewhere) and open as pictures (vd.images: no decompression bomb, a mode with a
meaningful RGB), and its array references (vd.arrays: the file opens, the key and row exist, the rank is right).
"""

import hashlib
import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vd import checks
from vd.arrays import ArrayFiles
from vd.images import open_image
from vd.sampling import DEFAULT_STRENGTH, STRENGTH_RULES
from vd.sched import SCHEDULERS, sampler_from_config

IMAGE_TASKS = ("text_to_image", "image_variation", "dual_guided", "blend")
TEXT_TASKS = ("image_to_text", "text_variation")
SIZE = ("height", "width", "num_inference_steps", "guidance_scale", "num_images_per_prompt", "eta", "scheduler",
        "output_type")
COMMON = ("negative_prompt", *SIZE)
START = ("latents", "init_image", "init_latents", "strength", "strength_rule")  # where an image flow starts
TEXT = ("num_inference_steps", "guidance_scale", "num_texts_per_prompt", "eta", "scheduler", "latents",
        "temperature", "top_k", "top_p", "greedy", "max_length", "dedupe", "output_type")
# each entry of REQUIRED is a group of alternatives: exactly one of them is given
REQUIRED = {"text_to_image": (("prompt", "prompt_embeds"),), "image_variation": (("image", "image_embeds"),),
            "dual_guided": (("prompt", "prompt_embeds"), ("image", "image_embeds")), "blend": (("images",),),
            "image_to_text": (("image", "image_embeds"),), "text_variation": (("prompt", "prompt_embeds"),)}
# not an argument of the facade's flows: settings over `pipe.scheduler_config` for the job's calls (runs alone)
SCHEDULER_SETTINGS = "scheduler_config"
OPTIONAL = {
    "text_to_image": (*COMMON, "negative_prompt_embeds", *START, SCHEDULER_SETTINGS),
    "image_variation": (*COMMON, "negative_image_embeds", "focus", "fidelity", "color_adjust", *START,
                        SCHEDULER_SETTINGS),
    "dual_guided": ("text_to_image_strength", *COMMON, "negative_prompt_embeds", "negative_image_embeds", *START,
                    SCHEDULER_SETTINGS),
    "blend": ("weights", "masks", "focus", "prompt", "prompt_embeds", "text_strength", *COMMON,
              "negative_prompt_embeds", *START, SCHEDULER_SETTINGS),
    "image_to_text": ("negative_image_embeds", *TEXT, SCHEDULER_SETTINGS),
    "text_variation": ("negative_prompt", "negative_prompt_embeds", *TEXT, SCHEDULER_SETTINGS),
}
EXCLUSIVE = (("prompt", "prompt_embeds"), ("negative_prompt", "negative_prompt_embeds"), ("image", "image_embeds"),
             ("init_image", "init_latents"), ("latents", "init_image"), ("latents", "init_latents"))
# jobs made only of these keys share facade calls (--batch-size); any other key makes a job run on its own
BATCHED = {"text_to_image", "image_variation", "dual_guided"}
BATCH_KEYS = {"task", "seed", "id", "prompt", "image", "text_to_image_strength", *COMMON}
# the arguments whose defaults a job's `args` (and so its digest) carries; the others only when given, so the jobs
# of the first three flows keep the digests that earlier versions wrote into their records
FILLED = {*BATCH_KEYS - {"output_type"}, "num_texts_per_prompt"}
OUTPUT_TYPES = ("pil", "latent")  # a PNG, or the final latents as a .npy file (float32 [1, 4, h, w])
TEXT_OUTPUT_TYPES = ("text", "latent")  # a sentence, or the text latents it decodes as a .npy file (float32 [1, 768])
PER_JOB = {"prompt", "image", "negative_prompt"}  # the arguments that may differ inside one batch
# array references: the rank of the array (a row keeps its leading batch dim of 1)
RANKS = {"prompt_embeds": 3, "negative_prompt_embeds": 3, "image_embeds": 3, "negative_image_embeds": 3,
         "init_latents": 4, "latents": 4}
TEXT_LATENT_RANK = 2  # the text flows' latents [N, 768]
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
VAE_FACTOR = 8  # VD's kl-f8; the facade checks the loaded VAE's own factor again
TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
              dict: "an object"}


def _id(name: str, value: str) -> str:
    if not ID.fullmatch(value):
        raise ValueError(f"{name}: expected 1-128 letters, digits, '.', '_' or '-' not starting with a symbol, "
                         f"got {value!r}")
    return value


def _numbers(low: float, high: float | None):
    """A number, or a list of 1 to checks.MAX_BLEND_IMAGES numbers (one per blended image), in [low, high]."""
    def check(name: str, value: object) -> object:
        if isinstance(value, list):
            if not 1 <= len(value) <= checks.MAX_BLEND_IMAGES:
                checks.fail(name, value, f"a number or a list of 1 to {checks.MAX_BLEND_IMAGES} numbers")
            return [checks.number(f"{name}[{i}]", v, low, high) for i, v in enumerate(value)]
        return checks.number(name, value, low, high)
    return check


def _paths(nullable: bool):
    """A list of 1 to checks.MAX_BLEND_IMAGES file paths (or nulls, where `nullable`)."""
    def check(name: str, value: list) -> list:
        if not 1 <= len(value) <= checks.MAX_BLEND_IMAGES:
            checks.fail(name, value, f"a list of 1 to {checks.MAX_BLEND_IMAGES} paths")
        for i, v in enumerate(value):
            if not (isinstance(v, str) or (nullable and v is None)):
                checks.fail(f"{name}[{i}]", v, "a path" + (" or null" if nullable else ""), TypeError)
        return value
    return check


def _temperature(name: str, value: float) -> float:
    if checks.number(name, value, 0.0) == 0:
        checks.fail(name, value, "a number > 0 (use greedy for argmax decoding)")
    return value


def _reference(name: str, value: dict) -> dict:
    """{"file": path, "key": name (optional), "index": row (optional)}: checked here for its form; the file, key,
    row and rank are checked with the job."""
    unknown = sorted(set(value) - {"file", "key", "index"})
    if unknown or not isinstance(value.get("file"), str):
        checks.fail(name, value, '{"file": PATH, "key": NAME (optional), "index": ROW (optional)}'
                    + (f" (unknown field(s) {', '.join(unknown)})" if unknown else ""))
    if "key" in value and not isinstance(value["key"], str):
        checks.fail(f"{name}.key", value["key"], "a string", TypeError)
    if "index" in value:
        checks.integer(f"{name}.index", value["index"], 0)
    return value


@dataclass(frozen=True)
class Key:
    """One job key: its JSON type(s) (float also takes integers) and a check (name, value) -> value that raises
    ValueError or TypeError with the name and the reason."""

    type: type | tuple[type, ...]
    check: Callable[[str, object], object] = lambda name, value: value


_UNIT = lambda n, v: checks.number(n, v, 0.0, 1.0)  # noqa: E731
KEYS = {
    "task": Key(str, lambda n, v: checks.choice(n, v, list(REQUIRED))),
    "seed": Key(int, lambda n, v: checks.seed(n, v)),
    "id": Key(str, _id),
    "prompt": Key(str),
    "image": Key(str),             # an image file, relative to the job file's folder
    "negative_prompt": Key(str),   # a text; for image_variation an image file
    "text_to_image_strength": Key(float, _UNIT),
    "height": Key(int, lambda n, v: checks.size(n, v, VAE_FACTOR)),
    "width": Key(int, lambda n, v: checks.size(n, v, VAE_FACTOR)),
    "num_inference_steps": Key(int, lambda n, v: checks.integer(n, v, 1, 1000)),
    "guidance_scale": Key(float, lambda n, v: checks.guidance(v)),
    "num_images_per_prompt": Key(int, lambda n, v: checks.integer(n, v, 1)),
    "num_texts_per_prompt": Key(int, lambda n, v: checks.integer(n, v, 1)),
    "eta": Key(float, lambda n, v: checks.eta(v)),
    "scheduler": Key(str, lambda n, v: checks.choice(n, v, list(SCHEDULERS))),  # ddim_inverse: _check_together
    "output_type": Key(str),  # its values depend on the task: _check_together
    SCHEDULER_SETTINGS: Key(dict),  # checked with the job's scheduler, in _check_together
    # image_variation: a number; blend: a number or one per image
    "focus": Key((float, list), _numbers(0.0, 1.0)),
    "fidelity": Key(float, _UNIT),
    "color_adjust": Key(bool),
    "init_image": Key(str),        # an image file, as `image`
    "strength": Key(float, _UNIT),
    "strength_rule": Key(str, lambda n, v: checks.choice(n, v, list(STRENGTH_RULES))),
    "images": Key(list, _paths(nullable=False)),  # blend: image files
    "weights": Key((float, list), _numbers(0.0, None)),
    "masks": Key(list, _paths(nullable=True)),    # blend: one image file or null per image
    "text_strength": Key(float, _UNIT),
    "temperature": Key(float, _temperature),
    "top_k": Key(int, lambda n, v: checks.integer(n, v, 0)),
    "top_p": Key(float, _UNIT),
    "greedy": Key(bool),
    "max_length": Key(int, lambda n, v: checks.integer(n, v, 2)),  # the facade checks Optimus' own limit
    "dedupe": Key(bool),
    **{name: Key(dict, _reference) for name in RANKS},  # conditions from a row of an array file
}


@dataclass
class Job:
    """One valid line of the job file."""

    line: int
    id: str
    task: str
    seed: int
    args: dict  # the facade's keyword arguments given, plus the defaults of FILLED; files as given (paths, references)
    alone: bool = False  # runs one output per facade call, on its own (see BATCH_KEYS)
    stamps: dict = field(default_factory=dict)  # array file -> [size, mtime_ns]
    arrays: ArrayFiles | None = field(default=None, repr=False, compare=False)

    @property
    def count_key(self) -> str:
        return "num_texts_per_prompt" if self.task in TEXT_TASKS else "num_images_per_prompt"

    @property
    def suffix(self) -> str:
        if self.args.get("output_type") == "latent":
            return ".npy"
        return ".txt" if self.task in TEXT_TASKS else ".png"

    @property
    def pixels(self) -> int:
        """The pixels of all its outputs (an unset size counts as VD's 512; 0 for texts): what the facade's
        per-call budget, vd.checks.MAX_PIXELS, counts."""
        if self.task not in IMAGE_TASKS:
            return 0
        return self.args[self.count_key] * (self.args["height"] or 512) * (self.args["width"] or 512)

    @property
    def names(self) -> list[str]:
        return [f"{self.id}-{k}" for k in range(self.args[self.count_key])]

    @property
    def digest(self) -> str:
        """SHA-256 of the job's task, seed and arguments (defaults included), and of the size and mtime of its
        array files: its records carry it, so an edited job (or array file) is never taken for finished."""
        job = dict(task=self.task, seed=self.seed, arguments=self.args)
        if self.stamps:
            job["array_files"] = self.stamps
        text = json.dumps(job, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def image_files(self) -> list[tuple[str, str]]:
        """(argument name, path) of every image file the job reads."""
        keys = ["image", "negative_prompt"] if self.task == "image_variation" else ["image"]
        files = [(k, self.args[k]) for k in (*keys, "init_image") if self.args.get(k) is not None]
        files += [(f"images[{i}]", p) for i, p in enumerate(self.args.get("images") or [])]
        files += [(f"masks[{i}]", p) for i, p in enumerate(self.args.get("masks") or []) if p is not None]
        return files

    def references(self) -> list[str]:
        return [k for k in RANKS if self.args.get(k) is not None]

    def inputs(self, folder: Path, anywhere: bool = False) -> dict:
        """The facade's arguments that name files, read: images as RGB PIL images, references as float32 tensors.
        ValueError if a file cannot be read (it changed since the job file was checked)."""
        opened = {}
        for name, path in self.image_files():
            opened[name] = open_image(image_path(folder, path, anywhere), name, as_is=name.startswith("masks"))
        loaded = {k: opened[k] for k in ("image", "negative_prompt", "init_image") if k in opened}
        if self.args.get("images") is not None:
            loaded["images"] = [opened[f"images[{i}]"] for i in range(len(self.args["images"]))]
        if self.args.get("masks") is not None:
            loaded["masks"] = [opened.get(f"masks[{i}]") for i in range(len(self.args["masks"]))]
        arrays = self.arrays or ArrayFiles()
        for key in self.references():
            ref = self.args[key]
            loaded[key] = arrays.array(image_path(folder, ref["file"], anywhere, key), ref.get("key")).read(
                ref.get("index"))
        return loaded

    def batch_key(self) -> tuple:
        if self.alone:
            return "alone", self.line
        shared = tuple((k, v) for k, v in sorted(self.args.items()) if k not in PER_JOB)
        return self.task, shared, self.args["negative_prompt"] is not None


def image_path(folder: Path, name: str, anywhere: bool, what: str = "image") -> Path:
    """The file an argument names: relative to the job file's folder, and inside it unless `anywhere`."""
    if not name:  # (else it would name the folder itself)
        raise ValueError(f"{what}: expected a file name, got ''")
    path = (folder / name).resolve()
    if not anywhere and not path.is_relative_to(folder.resolve()):
        raise ValueError(f"{what} {name!r} is outside the job file's folder {str(folder)!r} (pass --allow-any-path "
                         "to read it)")
    return path


def _is(value: object, want: type) -> bool:
    if want is bool or isinstance(value, bool):
        return want is bool and isinstance(value, bool)
    return isinstance(value, (int, float) if want is float else want)


def parse(text: str, line: int, folder: Path, anywhere: bool = False, opened: dict | None = None,
          arrays: ArrayFiles | None = None) -> Job:
    """One job line -> Job; ValueError(reason) if anything about it is wrong. `opened`: path -> reason it cannot
    be read ("" if it can), and `arrays`, the array files: shared between lines so each file is opened once."""
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
        checks.fail("task", task, f"one of {list(REQUIRED)}")
    keys = [k for group in REQUIRED[task] for k in group] + list(OPTIONAL[task])
    sig = inspect.signature(getattr(_facade(), task)).parameters
    # null where the Python default is None is that default (a record's arguments hold such nulls)
    obj = {k: v for k, v in obj.items()
           if not (v is None and k in keys and (k == SCHEDULER_SETTINGS or k in sig and sig[k].default is None))}
    unknown = sorted(set(obj) - {"task", "seed", "id", *keys})
    if unknown:
        names = ", ".join(k if len(k) <= 60 else k[:57] + "..." for k in unknown)
        raise ValueError(f"unknown key(s) for {task}: {names}")
    missing = ["seed"] * ("seed" not in obj) + [" or ".join(g) for g in REQUIRED[task] if not set(g) & set(obj)]
    if missing:
        raise ValueError(f"missing key(s): {', '.join(missing)}")
    for pair in EXCLUSIVE:
        if set(pair) <= set(obj):
            raise ValueError(f"{pair[0]} and {pair[1]}: expected one or the other, got both")
    for key, value in obj.items():
        want = KEYS[key].type if isinstance(KEYS[key].type, tuple) else (KEYS[key].type,)
        if not any(_is(value, t) for t in want):
            checks.fail(key, value, " or ".join(TYPE_NAMES[t] for t in want))
        try:
            KEYS[key].check(key, value)
        except (ValueError, TypeError) as e:
            raise ValueError(str(e)) from None
    _check_together(task, obj)
    args = {k: obj[k] if k in obj else sig[k].default for k in keys if k in obj or k in FILLED}
    checks.settled_start(obj.get("scheduler"), obj.get(SCHEDULER_SETTINGS, {}), obj.get("strength_rule"),
                         start=next((k for k in ("init_latents", "init_image") if k in obj), None),
                         fidelity=obj.get("fidelity", 0) > 0, strength=obj.get("strength", DEFAULT_STRENGTH),
                         steps=args["num_inference_steps"])
    alone = task not in BATCHED or not set(obj) <= BATCH_KEYS
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    job = Job(line, obj.get("id", hashlib.sha256(canonical.encode()).hexdigest()[:12]), task, obj["seed"], args,
              alone, arrays=ArrayFiles() if arrays is None else arrays)
    n = args[job.count_key]
    try:
        checks.seed("seed", obj["seed"], n)
        if task in IMAGE_TASKS:
            checks.pixel_budget(n, args["height"] or 512, args["width"] or 512)
        else:
            checks.text_budget(n)
    except ValueError as e:
        raise ValueError(f"{e} (output k of a job is seeded with seed + k; split larger jobs)") from None
    _check_images(job, folder, anywhere, {} if opened is None else opened)
    _check_references(job, folder, anywhere, n)
    return job


def _check_together(task: str, obj: dict) -> None:
    """What single keys cannot tell: a strength needs a start, fidelity the input image and no other start;
    blend's lists have one entry per image; DDIM inversion and colour matching need the output (and colour
    matching the colours) they make sense for: what the facade would refuse only once the job runs."""
    if "output_type" in obj:
        checks.choice("output_type", obj["output_type"], list(TEXT_OUTPUT_TYPES if task in TEXT_TASKS else
                                                              OUTPUT_TYPES))
    latent = obj.get("output_type") == "latent"
    if obj.get("scheduler") == "ddim_inverse" and not latent:
        checks.fail("scheduler", "ddim_inverse", 'a sampler that makes pictures or texts, or "output_type": "latent" '
                    "with it (DDIM inversion turns latents into noise)")
    if latent and obj.get("color_adjust"):
        checks.fail("color_adjust", True, 'false with "output_type": "latent" (colours are matched on the decoded '
                    "pictures)")
    starts = bool({"init_image", "init_latents"} & set(obj))
    for key in ("strength", "strength_rule"):
        if key in obj and not starts:
            raise ValueError(f"{key}: expected only with init_image or init_latents")
    if obj.get("fidelity", 0) > 0:  # fidelity f starts from the input image itself at strength 1 - f
        if "image" not in obj:
            checks.fail("fidelity", obj["fidelity"], '0 when the condition is given as image_embeds (fidelity starts '
                        'from the input image; give "init_image" with "strength")')
        if starts:
            checks.fail("fidelity", obj["fidelity"], '0 with "init_image" or "init_latents" (fidelity f is "init_image" '
                        'the input image with "strength" 1 - f)')
    if obj.get("color_adjust") and "image" not in obj and "init_image" not in obj:
        checks.fail("color_adjust", True, 'false when no "image" or "init_image" gives the colours')
    if task != "blend" and isinstance(obj.get("focus"), list):
        checks.fail("focus", obj["focus"], f"a number for {task}")
    for key in ("weights", "focus", "masks"):
        if task == "blend" and isinstance(obj.get(key), list) and len(obj[key]) != len(obj["images"]):
            raise ValueError(f"{key}: expected one entry per image ({len(obj['images'])}), got {len(obj[key])}")
    # alone, against the job's scheduler or else VD's DDIM (with the model's own settings, and its own sampler
    # where it names another, they are checked when the job runs)
    if SCHEDULER_SETTINGS in obj:
        try:
            sampler_from_config(obj.get("scheduler", "ddim"), obj[SCHEDULER_SETTINGS])
        except (ValueError, TypeError) as e:
            raise ValueError(f"{SCHEDULER_SETTINGS}: {e}") from None


def _check_images(job: Job, folder: Path, anywhere: bool, opened: dict) -> None:
    for name, rel in job.image_files():
        path = image_path(folder, rel, anywhere, name)
        if path not in opened:
            try:
                open_image(path, name)
                opened[path] = ""
            except ValueError as e:
                opened[path] = str(e)
        if opened[path]:
            raise ValueError(opened[path])


def _check_references(job: Job, folder: Path, anywhere: bool, n: int) -> None:
    """Each array reference: inside the folder, the file opens, the key and row exist, the rank and the number
    of rows fit the argument (the facade checks the exact sizes when the job runs)."""
    for key in job.references():
        ref = job.args[key]
        path = image_path(folder, ref["file"], anywhere, key)
        if not path.is_file():
            raise ValueError(f"{key}: no such file {ref['file']!r} in {str(folder)!r}")
        try:
            array = job.arrays.array(path, ref.get("key"))
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
        rank = TEXT_LATENT_RANK if key == "latents" and job.task in TEXT_TASKS else RANKS[key]
        where = f"{ref['file']!r}" + (f" key {ref['key']!r}" if "key" in ref else "")
        if len(array.shape) != rank:
            raise ValueError(f"{key}: expected an array of {rank} dimensions (a row keeps its leading batch "
                             f"dimension of 1), got shape {list(array.shape)} in {where}")
        if not array.floating:
            raise ValueError(f"{key}: expected floating-point values in {where}")
        index = ref.get("index")
        if index is not None and index >= array.shape[0]:
            raise ValueError(f"{key}: index {index} is out of range for {where} ({array.shape[0]} rows)")
        rows = array.shape[0] if index is None else 1
        allowed, what = {"latents": ((n,), "one per output"), "init_latents": ((1, n), "one, or one per output")
                         }.get(key, ((1,), "a job is one prompt"))
        if rows not in allowed:
            hint = '; give "index" to take one row' if index is None else ""
            raise ValueError(f"{key}: expected {' or '.join(map(str, sorted(set(allowed))))} row(s) ({what}), got "
                             f"{rows} in {where}{hint}")
        job.stamps[ref["file"]] = ArrayFiles.stamp(path)


def read_jobs(path: Path, anywhere: bool = False) -> tuple[list[Job], list[tuple[int, str]]]:
    """The jobs of a JSONL file, and (line number, reason) for each line that is not a valid job."""
    jobs, malformed, first_line, opened, arrays = [], [], {}, {}, ArrayFiles()
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            text = raw.decode("utf-8-sig")  # -sig: a byte-order mark on line 1 is not an error
            if not text.strip():
                continue
            job = parse(text, number, path.parent, anywhere, opened, arrays)
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


def _facade():
    from vd.pipeline import VersatileDiffusion
    return VersatileDiffusion
