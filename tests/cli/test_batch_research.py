"""`vd batch` for research datasets, on the tiny random pipeline: every flow (blend and the text flows included)
with the new options and conditions taken from rows of .npy, .pt and .safetensors files equals the facade call
with the same arguments and per-output seeds (images bit for bit, texts exactly); every bad array reference is a
malformed line with its reason while the other jobs run; finished text jobs are skipped on a rerun, and an array
file rewritten in place redoes its jobs."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_pipeline as tp
from helpers import random_image

pytest.importorskip("diffusers")

from vd import VersatileDiffusion  # noqa: E402
from vd.batch import main, make_batches, read_jobs  # noqa: E402
from vd.tasks import TASKS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
SMALL = dict(height=32, width=32, num_inference_steps=2)
TEXT = dict(num_inference_steps=2)
D, WIDE = 16, tp.TEXT_UNET["in_channels"][0]  # the tiny model's context width and text-latent width


def _ref(file: str, index: int | None = None, key: str | None = None) -> dict:
    return {"file": file, **({"key": key} if key else {}), **({"index": index} if index is not None else {})}


JOBS = [
    dict(task="text_to_image", id="t2i", seed=1, num_images_per_prompt=2, prompt_embeds=_ref("pred_text.npy", 1),
         negative_prompt_embeds=_ref("text.pt", 0, "ctx"), init_image="low.png", strength=0.5, **SMALL),
    dict(task="text_to_image", id="t2i-latents", seed=2, num_images_per_prompt=2, prompt="the cat",
         latents=_ref("latents.pt"), **SMALL),
    dict(task="image_variation", id="focus", seed=3, num_images_per_prompt=2, image="in.png", focus=0.3,
         color_adjust=True, **SMALL),
    dict(task="image_variation", id="fidelity", seed=4, image="in.png", fidelity=0.5, **SMALL),
    dict(task="dual_guided", id="recon", seed=5, prompt_embeds=_ref("text.pt", 2, "ctx"),
         image_embeds=_ref("vision.safetensors", 0, "v"), init_image="low.png", strength=0.75,
         text_to_image_strength=0.4, **SMALL),
    dict(task="blend", id="blend", seed=6, num_images_per_prompt=2, images=["in.png", "in2.png"], weights=[1, 0.5],
         masks=["mask.png", None], focus=[0.3, 0.6], prompt="the cat", text_strength=0.3, **SMALL),
    dict(task="image_variation", id="mindeye", seed=10, image_embeds=_ref("pred_vision.npy", 1), init_image="low.png",
         strength=0.85, scheduler="unipc", guidance_scale=3.5, **SMALL),
    dict(task="text_to_image", id="img2img", seed=11, prompt="the cat", init_image="low.png", strength=0.5,
         strength_rule="diffusers", **SMALL),
    dict(task="image_to_text", id="caption", seed=7, num_texts_per_prompt=2, image="in.png", temperature=0.7,
         top_k=5, **TEXT),
    dict(task="image_to_text", id="caption-embeds", seed=8, num_texts_per_prompt=2,
         image_embeds=_ref("pred_vision.npy", 0), greedy=True, latents=_ref("text_latents.npy"), **TEXT),
    dict(task="text_variation", id="rephrase", seed=9, prompt_embeds=_ref("vision.safetensors", 1, "t"),
         top_p=0.9, max_length=10, dedupe=False, **TEXT),
]


@pytest.fixture(scope="module")
def pipe(model) -> VersatileDiffusion:
    return VersatileDiffusion.from_pretrained(model, tasks=list(TASKS), device="cpu")


def _inputs(folder: Path) -> None:
    """The pictures and array files the jobs name."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, seed, size in [("in.png", 0, (40, 56)), ("in2.png", 1, (40, 40)), ("low.png", 2, (32, 32))]:
        random_image(seed, size).save(folder / name)
    PIL.Image.fromarray(np.where(np.arange(40)[:, None] < 20, 255, 0).repeat(56, 1).astype(np.uint8)).save(
        folder / "mask.png")
    rng = np.random.RandomState(0)
    np.save(folder / "pred_text.npy", (rng.randn(3, 77, D) * 0.1).astype(np.float32))
    np.save(folder / "pred_vision.npy", (rng.randn(2, 257, D) * 0.1).astype(np.float16))
    np.save(folder / "text_latents.npy", rng.randn(2, WIDE).astype(np.float32))
    torch.save({"ctx": torch.from_numpy(rng.randn(3, 77, D) * 0.1).float(), "other": torch.zeros(1)},
               folder / "text.pt")
    torch.save(torch.from_numpy(rng.randn(2, 4, 4, 4)).float(), folder / "latents.pt")
    save_file({"v": torch.from_numpy(rng.randn(2, 257, D) * 0.1).float(),
               "t": torch.from_numpy(rng.randn(2, 77, D) * 0.1).float()}, folder / "vision.safetensors")


def _write(folder: Path, lines: list) -> Path:
    _inputs(folder)
    raw = [line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines]
    (folder / "jobs.jsonl").write_bytes(b"\n".join(raw) + b"\n")
    return folder / "jobs.jsonl"


def _run(jobs: Path, out: Path, model: Path, *extra) -> int:
    return main([str(jobs), "--out", str(out), "--model", str(model), "--no-progress", *map(str, extra)])


def _array(folder: Path, ref: dict) -> torch.Tensor:
    """A reference read independently of vd: the whole file, then the row."""
    path = folder / ref["file"]
    if path.suffix == ".npy":
        a = torch.from_numpy(np.load(path))
    elif path.suffix == ".pt":
        a = torch.load(path, weights_only=True)
        a = a[ref["key"]] if "key" in ref else a
    else:
        a = load_file(path)[ref["key"]]
    a = a.float()
    return a[ref["index"]][None] if "index" in ref else a


def _facade_call(pipe, folder: Path, line: dict, k: int):
    """Output k of a job line as one facade call: its arguments, one output, generator seed + k (a text job's
    sentence, or its text latents [768] with "output_type": "latent")."""
    kw = {key: v for key, v in line.items() if key not in ("task", "id", "seed")}
    count = "num_texts_per_prompt" if line["task"] in ("image_to_text", "text_variation") else "num_images_per_prompt"
    text_latents = count == "num_texts_per_prompt" and kw.pop("output_type", None) == "latent"
    n = kw.get(count, 1)
    kw[count] = 1
    for key in ("image", "init_image"):
        if key in kw:
            kw[key] = PIL.Image.open(folder / kw[key]).convert("RGB")
    if "images" in kw:
        kw["images"] = [PIL.Image.open(folder / p).convert("RGB") for p in kw["images"]]
        kw["masks"] = [None if m is None else PIL.Image.open(folder / m).convert("RGB") for m in kw["masks"]]
    for key, value in list(kw.items()):
        if isinstance(value, dict):
            a = _array(folder, value)
            kw[key] = a[k:k + 1] if key in ("latents", "init_latents") and len(a) == n else a
    out = getattr(pipe, line["task"])(**kw, generator=torch.Generator().manual_seed(line["seed"] + k),
                                      progress=False)
    if text_latents:
        return out.latents[0]
    return out.texts[0] if count == "num_texts_per_prompt" else out.images[0]


def test_every_flow_equals_the_facade_call(model, pipe, tmp_path, capsys):
    jobs = _write(tmp_path, JOBS)
    assert _run(jobs, tmp_path / "out", model, "--batch-size", 4) == 0, capsys.readouterr()
    parsed, _ = read_jobs(jobs)
    assert [len(b) for b in make_batches(parsed, 4)] == [1] * len(JOBS)  # each research job runs alone
    out = tmp_path / "out"
    for line, job in zip(JOBS, parsed):
        for k, name in enumerate(job.names):
            want = _facade_call(pipe, tmp_path, line, k)
            record = json.loads((out / f"{name}.json").read_text())
            assert record["job_sha256"] == job.digest and record["image_seed"] == line["seed"] + k
            if isinstance(want, str):
                assert (out / f"{name}.txt").read_text() == want + "\n", name
                assert record["text"] == f"{name}.txt" and record["sentence"] == want
            else:
                got = np.asarray(PIL.Image.open(out / f"{name}.png"))
                assert np.array_equal(got, np.asarray(want)), name
    assert len((out / "records.jsonl").read_text().splitlines()) == sum(len(j.names) for j in parsed)


def test_bad_references_are_malformed_lines(model, tmp_path, capsys):
    cat = dict(task="text_to_image", seed=1, **SMALL)
    lines = [
        dict(cat, prompt="the cat"),                                                  # 1: fine
        dict(cat, prompt_embeds=_ref("missing.npy", 0)),                              # 2: no such file
        dict(cat, prompt_embeds=_ref("../pred_text.npy", 0)),                         # 3: outside the folder
        dict(cat, prompt_embeds=_ref("text.pt", 0, "nope")),                          # 4: bad key
        dict(cat, prompt_embeds=_ref("vision.safetensors", 0)),                       # 5: safetensors needs a key
        dict(cat, prompt_embeds=_ref("pred_text.npy", 0, "x")),                       # 6: .npy takes no key
        dict(cat, prompt_embeds=_ref("pred_text.npy", 3)),                            # 7: index out of range
        dict(cat, prompt_embeds=_ref("text_latents.npy", 0)),                         # 8: wrong rank
        dict(cat, prompt_embeds=_ref("pred_text.npy")),                               # 9: 3 rows for one prompt
        dict(cat, prompt_embeds=_ref("ints.npy", 0)),                                 # 10: not floats
        dict(cat, prompt_embeds={"file": "pred_text.npy", "row": 0}),                 # 11: unknown field
        dict(cat, prompt_embeds=_ref("jobs.jsonl", 0)),                               # 12: not an array file
        dict(cat, prompt_embeds=_ref("narrow.npy", 0)),                               # 13: fails when it runs
        dict(cat, prompt="the cat", prompt_embeds=_ref("pred_text.npy", 0)),          # 14: both
        dict(cat, prompt="a", strength=0.5),                                          # 15: strength, no start
        dict(cat, prompt="a", num_images_per_prompt=3, latents=_ref("latents.pt")),   # 16: 2 rows for 3 images
        dict(task="blend", seed=1, images=["in.png"], weights=[1, 2], **SMALL),       # 17: a weight per image
        dict(task="image_to_text", seed=1, image="in.png", greedy=1),                 # 18: not a boolean
        dict(cat, prompt="the cat", seed=2),                                          # 19: fine
    ]
    jobs = _write(tmp_path, lines)
    np.save(tmp_path / "ints.npy", np.zeros((2, 77, D), dtype=np.int64))
    np.save(tmp_path / "narrow.npy", np.zeros((2, 77, D // 2), dtype=np.float32))
    np.save(tmp_path.parent / "pred_text.npy", np.zeros((2, 77, D), dtype=np.float32))
    assert _run(jobs, tmp_path / "out", model) == 1
    out = capsys.readouterr().out
    for line, reason in [(2, "prompt_embeds: no such file 'missing.npy'"), (3, "outside the job file's folder"),
                         (4, "\"key\" naming one of its tensors ['ctx', 'other'], got 'nope'"),
                         (5, "\"key\" naming one of its tensors ['t', 'v'], got None"),
                         (6, "holds one array: give no \"key\""),
                         (7, "index 3 is out of range for 'pred_text.npy' (3 rows)"),
                         (8, "expected an array of 3 dimensions"),
                         (9, "expected 1 row(s) (a job is one prompt), got 3 in 'pred_text.npy'"),
                         (10, "floating-point"), (11, "unknown field(s) row"), (12, "expected a .npy, .pt"),
                         (14, "prompt and prompt_embeds: expected one or the other"),
                         (15, "strength: expected only with init_image or init_latents"),
                         (16, "latents: expected 3 row(s) (one per output), got 2 in"),
                         (17, "weights: expected one entry per image (1)"),
                         (18, "greedy: expected true or false, got 1")]:
        assert f"malformed: line {line}: " in out and reason in out.split(f"malformed: line {line}: ")[1], line
    assert "failed: line 13" in out and "prompt_embeds" in out.split("failed: line 13")[1]
    assert "3 jobs: 2 done, 0 skipped" in out and "1 failed; 16 malformed line(s)" in out


# starts that the job's own scheduler or strength_rule settles, so that they are refused with the line, and the
# facade arguments of the same job (files opened)
START_CASES = {
    "pndm_takes_no_init_image": dict(task="text_to_image", prompt="the cat", init_image="low.png", scheduler="pndm"),
    "original_rule_is_ddims": dict(task="dual_guided", prompt="the cat", image="in.png", scheduler="euler",
                                   init_latents=_ref("latents.pt", 0), strength_rule="original"),
    "fidelity_is_ddims": dict(task="image_variation", image="in.png", fidelity=0.5, scheduler="unipc"),
    "no_step_to_run": dict(task="blend", images=["in.png"], init_image="low.png", strength=0.4,
                           strength_rule="diffusers"),  # 0.4 x 2 steps: none
}


def _facade_args(folder: Path, job: dict) -> dict:
    files = {"image": lambda v: PIL.Image.open(folder / v), "init_image": lambda v: PIL.Image.open(folder / v),
             "images": lambda v: [PIL.Image.open(folder / f) for f in v], "init_latents": lambda v: _array(folder, v)}
    return {k: files[k](v) if k in files else v for k, v in job.items() if k not in ("task", "seed")}


@pytest.mark.parametrize("case", list(START_CASES))
def test_starts_the_job_settles_are_refused_with_the_line(case, pipe, tmp_path):
    """Such a line is malformed with the reason the facade gives when it runs; without the scheduler and the
    strength_rule it is a job (the rule then follows the model's default sampler)."""
    job = dict(START_CASES[case], seed=1, **SMALL)
    unsettled = {k: v for k, v in job.items() if k not in ("scheduler", "strength_rule")}
    jobs, malformed = read_jobs(_write(tmp_path, [job, unsettled]))
    assert [j.line for j in jobs] == [2] and [line for line, _ in malformed] == [1]
    with pytest.raises(ValueError) as facade:
        getattr(pipe, job["task"])(**_facade_args(tmp_path, job), progress=False)
    assert malformed[0][1] == str(facade.value)


def test_resume_skips_finished_text_jobs_and_redoes_rewritten_arrays(model, tmp_path, capsys):
    lines = [dict(task="text_variation", id="words", seed=3, prompt_embeds=_ref("pred_text.npy", 2), **TEXT),
             dict(task="image_to_text", id="caption", seed=4, image="in.png", num_texts_per_prompt=2, **TEXT)]
    jobs, out = _write(tmp_path, lines), tmp_path / "out"
    assert _run(jobs, out, model) == 0
    assert sorted(p.name for p in out.glob("*.txt")) == ["caption-0.txt", "caption-1.txt", "words-0.txt"]
    capsys.readouterr()
    assert _run(jobs, out, model) == 0
    assert "2 jobs: 0 done, 2 skipped" in capsys.readouterr().out
    (out / "caption-1.txt").unlink()  # an output lost: only its job is redone
    assert _run(jobs, out, model) == 0
    assert "2 jobs: 1 done, 1 skipped" in capsys.readouterr().out
    np.save(tmp_path / "pred_text.npy", np.zeros((3, 77, D), dtype=np.float32))  # rewritten in place
    assert _run(jobs, out, model) == 0
    assert "2 jobs: 1 done, 1 skipped" in capsys.readouterr().out


def test_plain_jobs_keep_their_digests(tmp_path):
    """A job of the first three flows carries the arguments (and so the digest) earlier versions wrote into its
    records: the new keys appear only when given, so an existing output folder is not redone after an update."""
    jobs = _write(tmp_path, [dict(task="text_to_image", prompt="a", seed=1),
                             dict(task="text_to_image", prompt="a", seed=1, init_image="low.png")])
    plain, research = read_jobs(jobs)[0]
    assert plain.args == dict(prompt="a", negative_prompt=None, height=None, width=None, num_inference_steps=50,
                              guidance_scale=7.5, num_images_per_prompt=1, eta=0.0, scheduler=None)
    assert plain.digest.startswith("54435ca9ccea")  # as written by the version before the research keys
    assert research.args == dict(plain.args, init_image="low.png") and research.alone and not plain.alone


def test_latent_outputs_and_inversion(model, pipe, tmp_path, capsys):
    """"output_type": "latent" writes each output's latents as a float32 .npy of one row, batched plain jobs too,
    exactly as the facade returns them; DDIM inversion runs with it, and its noise, named as a later job's
    `latents`, gives what the facade gives from it. Finished .npy outputs are skipped on a rerun."""
    latent = dict(output_type="latent", **SMALL)
    lines = [dict(task="text_to_image", id="a", seed=1, prompt="the cat", num_images_per_prompt=2, **latent),
             dict(task="text_to_image", id="b", seed=2, prompt="a dog", num_images_per_prompt=2, **latent),
             dict(task="image_variation", id="keep", seed=3, image="in.png", fidelity=1.0, **latent),
             dict(task="dual_guided", id="inv", seed=4, prompt="the cat", image="in.png", latents=_ref("x0.npy"),
                  scheduler="ddim_inverse", guidance_scale=1.0, **latent)]
    jobs = _write(tmp_path, lines)
    np.save(tmp_path / "x0.npy", np.random.RandomState(1).randn(1, 4, 4, 4).astype(np.float32))
    out = tmp_path / "out"
    assert _run(jobs, out, model, "--batch-size", 4) == 0, capsys.readouterr()
    parsed, _ = read_jobs(jobs)
    assert [[j.id for j in b] for b in make_batches(parsed, 4)] == [["a", "b"], ["keep"], ["inv"]]

    def saved(name: str) -> np.ndarray:
        a = np.load(out / f"{name}.npy")
        assert a.dtype == np.float32 and a.shape == (1, 4, 4, 4), name
        record = json.loads((out / f"{name}.json").read_text())
        assert record["latents"] == f"{name}.npy" and "image" not in record
        return a[0]

    seeds = [torch.Generator().manual_seed(s) for s in (1, 2, 2, 3)]  # the batched call: a-0, a-1, b-0, b-1
    together = pipe.text_to_image(["the cat", "a dog"], num_images_per_prompt=2, generator=seeds, progress=False,
                                  **latent).images
    for i, name in enumerate(["a-0", "a-1", "b-0", "b-1"]):
        assert np.array_equal(saved(name), together[i].numpy()), name
    for line in lines[2:]:
        assert np.array_equal(saved(f"{line['id']}-0"), _facade_call(pipe, tmp_path, line, 0).numpy()), line["id"]
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".json") == [
        "a-0.npy", "a-1.npy", "b-0.npy", "b-1.npy", "inv-0.npy", "keep-0.npy", "records.jsonl"]
    capsys.readouterr()
    assert _run(jobs, out, model, "--batch-size", 4) == 0
    assert "4 jobs: 0 done, 4 skipped" in capsys.readouterr().out

    back = dict(task="dual_guided", id="back", seed=5, prompt="the cat", image="in.png", guidance_scale=1.0,
                latents=_ref("out/inv-0.npy"), **SMALL)
    (tmp_path / "back.jsonl").write_text(json.dumps(back) + "\n")
    assert _run(tmp_path / "back.jsonl", tmp_path / "back", model) == 0
    want = _facade_call(pipe, tmp_path, back, 0)
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "back" / "back-0.png")), np.asarray(want))


def test_text_latent_outputs(model, pipe, tmp_path, capsys):
    """A text job with "output_type": "latent" writes each output's text latents, float32 [1, 768] (the tiny
    model's width here), exactly as the facade returns them, instead of the sentence; a later job names the file
    again as its `latents`. Finished ones are skipped on a rerun."""
    lines = [dict(task="image_to_text", id="cap", seed=1, image="in.png", num_texts_per_prompt=2,
                  output_type="latent", **TEXT),
             dict(task="text_variation", id="words", seed=2, prompt="the cat", output_type="latent", **TEXT),
             dict(task="text_variation", id="said", seed=3, prompt="the cat", output_type="text", **TEXT)]
    jobs, out = _write(tmp_path, lines), tmp_path / "out"
    assert _run(jobs, out, model) == 0, capsys.readouterr()
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".json") == [
        "cap-0.npy", "cap-1.npy", "records.jsonl", "said-0.txt", "words-0.npy"]
    for line, k in [(lines[0], 0), (lines[0], 1), (lines[1], 0)]:
        name = f"{line['id']}-{k}"
        a = np.load(out / f"{name}.npy")
        assert a.dtype == np.float32 and a.shape == (1, WIDE), name
        assert json.loads((out / f"{name}.json").read_text())["latents"] == f"{name}.npy"
        assert np.array_equal(a[0], _facade_call(pipe, tmp_path, line, k).numpy()), name
    assert (out / "said-0.txt").read_text() == _facade_call(pipe, tmp_path, lines[2], 0) + "\n"
    capsys.readouterr()
    assert _run(jobs, out, model) == 0
    assert "3 jobs: 0 done, 3 skipped" in capsys.readouterr().out

    again = dict(task="image_to_text", id="again", seed=4, image="in.png", latents=_ref("out/cap-1.npy"), **TEXT)
    (tmp_path / "again.jsonl").write_text(json.dumps(again) + "\n")
    assert _run(tmp_path / "again.jsonl", tmp_path / "again", model) == 0
    assert (tmp_path / "again" / "again-0.txt").read_text() == _facade_call(pipe, tmp_path, again, 0) + "\n"


def test_start_and_output_lines_checked(tmp_path):
    plain = dict(task="image_variation", image="in.png", seed=1)
    lines = [dict(plain, output_type="np"), dict(plain, output_type="latent", color_adjust=True),
             dict(task="image_to_text", image="in.png", seed=1, output_type="pil"),
             dict(task="image_to_text", image="in.png", seed=1, scheduler="ddim_inverse"),
             dict(plain, output_type="latent", scheduler="ddim_inverse"),
             dict(plain, strength_rule="diffusers"), dict(plain, init_image="in.png", strength_rule="img2img"),
             dict(plain, output_type="text"), dict(task="text_variation", prompt="a", seed=1, output_type="latent"),
             # what the facade would refuse when the job runs, refused when the file is read
             dict(task="image_variation", image_embeds=_ref("pred_vision.npy", 0), seed=1, fidelity=0.5),
             dict(plain, fidelity=0.5, init_image="low.png"),
             dict(task="image_variation", image_embeds=_ref("pred_vision.npy", 0), seed=1, color_adjust=True),
             dict(plain, fidelity=0.5, color_adjust=True)]
    jobs, bad = read_jobs(_write(tmp_path, lines))
    assert bad == [(1, "output_type: expected one of ['pil', 'latent'], got 'np'"),
                   (2, "color_adjust: expected false with \"output_type\": \"latent\" (colours are matched on the "
                       "decoded pictures), got True"),
                   (3, "output_type: expected one of ['text', 'latent'], got 'pil'"),
                   (4, "scheduler: expected a sampler that makes pictures or texts, or \"output_type\": \"latent\" "
                       "with it (DDIM inversion turns latents into noise), got 'ddim_inverse'"),
                   (6, "strength_rule: expected only with init_image or init_latents"),
                   (7, "strength_rule: expected one of ['original', 'diffusers'], got 'img2img'"),
                   (8, "output_type: expected one of ['pil', 'latent'], got 'text'"),
                   (10, "fidelity: expected 0 when the condition is given as image_embeds (fidelity starts from the "
                        'input image; give "init_image" with "strength"), got 0.5'),
                   (11, 'fidelity: expected 0 with "init_image" or "init_latents" (fidelity f is "init_image" the '
                        'input image with "strength" 1 - f), got 0.5'),
                   (12, 'color_adjust: expected false when no "image" or "init_image" gives the colours, got True')]
    assert [j.suffix for j in jobs] == [".npy", ".npy", ".png"]
