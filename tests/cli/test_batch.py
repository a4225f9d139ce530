"""`vd batch` on the tiny random pipeline, on CPU: outputs equal direct facade calls, 2 gloo ranks write the same
files as 1 process, a run killed midway (SIGTERM, SIGKILL) completes on restart with every image exactly once,
and malformed lines are reported and skipped.

Every run uses one thread per process (torchrun's default for its workers), so the CPU kernels sum in the same
order in the runs compared byte for byte.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import transformers

import vd
from helpers import REPO

pytest.importorskip("diffusers")  # tiny_pipeline writes the model with diffusers

from vd import VersatileDiffusion  # noqa: E402
from vd.batch import main, make_batches, read_jobs, run_info  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
SMALL = dict(height=32, width=32, num_inference_steps=2)
JOBS = [
    dict(task="text_to_image", prompt="the cat", seed=1, **SMALL),
    dict(task="text_to_image", prompt="a dog running", seed=2, num_images_per_prompt=2, **SMALL),
    dict(task="text_to_image", prompt="rain", negative_prompt="the", seed=3, **SMALL),
    dict(task="image_variation", image="in.png", seed=4, id="variation", **SMALL),
    dict(task="dual_guided", prompt="the cat", image="in.png", text_to_image_strength=0.3, seed=5, **SMALL),
    dict(task="text_to_image", prompt="the cat", seed=6, eta=0.5, **SMALL),
    dict(task="text_to_image", prompt="and then", seed=7, **SMALL),
    dict(task="text_to_image", prompt="a dog", seed=8, **SMALL),
]


def _write_jobs(folder: Path, jobs: list, extra_lines: tuple[bytes, ...] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    PIL.Image.fromarray((rng.rand(40, 56, 3) * 255).astype(np.uint8)).save(folder / "in.png")
    lines = [json.dumps(j).encode() for j in jobs] + list(extra_lines)
    (folder / "jobs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return folder / "jobs.jsonl"


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _run_in_process(*argv) -> int:
    return main([str(a) for a in argv] + ["--no-progress"])


def _expected_names(jobs_file: Path) -> set[str]:
    jobs, _ = read_jobs(jobs_file)
    return {f"{n}.{ext}" for j in jobs for n in j.names for ext in ("png", "json")} | {"records.jsonl"}


def _pngs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(model, tmp_path_factory) -> Path:
    """One in-process run of JOBS with --batch-size 2; returns its output folder."""
    jobs = _write_jobs(tmp_path_factory.mktemp("single"), JOBS)
    out = jobs.parent / "out"
    assert _run_in_process(jobs, "--out", out, "--model", model, "--batch-size", 2) == 0
    return out


def test_outputs_equal_direct_calls(single, model):
    jobs, malformed = read_jobs(single.parent / "jobs.jsonl")
    assert not malformed
    assert set(os.listdir(single)) == _expected_names(single.parent / "jobs.jsonl")
    pipe = VersatileDiffusion.from_pretrained(model)
    image = PIL.Image.open(single.parent / "in.png").convert("RGB")
    for job in jobs:
        for k, name in enumerate(job.names):
            # image k of a job is what one call seeded with seed + k draws
            kw = dict(job.args, num_images_per_prompt=1, output_type="np", progress=False,
                      generator=torch.Generator().manual_seed(job.seed + k))
            if "image" in kw:
                kw["image"] = image
            ref = getattr(pipe, job.task)(**kw).images[0]
            png = np.asarray(PIL.Image.open(single / f"{name}.png"), dtype=np.float32) / 255
            # a float difference from batching (~1e-5, see below) may move a pixel across a rounding step
            assert np.abs(png - ref).max() <= 0.5 / 255 + 1e-5, name
            record = json.loads((single / f"{name}.json").read_text())
            assert (record["id"], record["seed"], record["image_seed"], record["index"]) == (
                job.id, job.seed, job.seed + k, k)
            assert record["arguments"] == job.args and record["model"] == str(model)
            assert record["model_revision"].startswith("sha256:")
            # what the images' last bits depend on: the software and, on the CPU, the thread count (1 in the suite)
            v = record["versions"]
            assert (v["vd"], v["torch"], v.get("cuda"), v["transformers"]) == (
                vd.__version__, torch.__version__, torch.version.cuda, transformers.__version__)
            assert (record["device"], record["cpu_threads"]) == ("cpu", 1)
    records = _records(single)
    assert [r["image"] for r in records] == [f"{n}.png" for j in jobs for n in j.names]


def test_a_record_on_a_gpu_names_its_model(monkeypatch):
    """On a GPU a record names the GPU's model (torch's answer for the record's device, stood in for: CI has no
    GPU), and no CPU thread count."""
    names = {}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: names.setdefault(d, "NVIDIA H100 80GB HBM3"))
    info = run_info(torch.float16, torch.device("cuda:1"))
    assert (info["dtype"], info["device"], info["gpu"]) == ("float16", "cuda", "NVIDIA H100 80GB HBM3")
    assert list(names) == [torch.device("cuda:1")] and "cpu_threads" not in info


def test_batching_changes_no_image(single, model, tmp_path, check):
    """--batch-size 1 against the fixture's --batch-size 2; and a batched facade call against one call per job."""
    jobs = _write_jobs(tmp_path, JOBS)
    assert _run_in_process(jobs, "--out", tmp_path / "out", "--model", model, "--batch-size", 1) == 0
    one, two = _pngs(tmp_path / "out"), _pngs(single)
    assert one.keys() == two.keys()
    for name in one:
        a = np.asarray(PIL.Image.open(tmp_path / "out" / name), dtype=np.int16)
        b = np.asarray(PIL.Image.open(single / name), dtype=np.int16)
        # equal PNGs, or at most one 8-bit step where a float difference crossed a rounding boundary
        assert np.abs(a - b).max() <= 1, name
    # the float images: batching changes only the summation order in the kernels (measured 6e-6 to 1.3e-5)
    pipe = VersatileDiffusion.from_pretrained(model, tasks=["text_to_image"])
    prompts, seeds = ["the cat", "a dog running", "rain"], [1, 2, 3]

    def gens(ss):
        return [torch.Generator().manual_seed(s) for s in ss]

    kw = dict(output_type="np", progress=False, **SMALL)
    together = pipe.text_to_image(prompts, generator=gens(seeds), **kw).images
    alone = np.concatenate([pipe.text_to_image(p, generator=gens([s]), **kw).images for p, s in zip(prompts, seeds)])
    check(float(np.abs(together - alone).max()), 5e-5, "batched vs one call per prompt")


def test_two_gloo_ranks_write_the_same_files(single, model):
    out = single.parent / "out2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "vd",
           "batch", str(single.parent / "jobs.jsonl"), "--out", str(out), "--model", str(model), "--batch-size", "2"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 jobs: 8 done, 0 skipped" in proc.stdout and "on 2 rank(s)" in proc.stdout
    assert _pngs(out) == _pngs(single)  # byte for byte

    def strip(records):
        return [{k: v for k, v in r.items() if k != "time"} for r in records]

    assert strip(_records(out)) == strip(_records(single))


MANY = [dict(task="text_to_image", prompt=f"the cat {i}", seed=i, height=32, width=32, num_inference_steps=8)
        for i in range(16)]


def _check_complete(jobs: Path, out: Path) -> None:
    expected = _expected_names(jobs)
    assert set(os.listdir(out)) == expected  # every image exactly once, nothing else
    assert sorted(r["image"] for r in _records(out)) == sorted(n for n in expected if n.endswith(".png"))
    for name in (n for n in expected if n.endswith(".png")):
        PIL.Image.open(out / name).verify()


def test_sigterm_midway_then_restart_completes(model, tmp_path, monkeypatch, capsys):
    """SIGTERM arrives between an image and its record: the pair is finished, then the run stops."""
    import vd.files
    jobs, out = _write_jobs(tmp_path, MANY), tmp_path / "out"
    writes, real_write = [], vd.files.write_bytes

    def write_then_signal(path: Path, data: bytes) -> None:
        real_write(path, data)
        writes.append(path.name)
        if len(writes) == 5:  # the third image
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(vd.files, "write_bytes", write_then_signal)
    assert _run_in_process(jobs, "--out", out, "--model", model) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert writes[-1].endswith("-0.json") and len(writes) == 6
    assert sorted(os.listdir(out)) == sorted(writes)  # three pairs, no temporary file, no records.jsonl yet
    monkeypatch.setattr(vd.files, "write_bytes", real_write)
    assert _run_in_process(jobs, "--out", out, "--model", model) == 0
    assert f"{len(MANY)} jobs: {len(MANY) - 3} done, 3 skipped" in capsys.readouterr().out
    _check_complete(jobs, out)


def test_sigkill_midway_then_restart_completes(model, tmp_path):
    jobs, out = _write_jobs(tmp_path, MANY), tmp_path / "out"
    cmd = [sys.executable, "-m", "vd", "batch", str(jobs), "--out", str(out), "--model", str(model), "--no-progress"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(list(out.glob("*.json"))) < 2:
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    left = set(os.listdir(out))
    assert 2 <= len([n for n in left if n.endswith(".json")]) < len(MANY)
    # what a kill inside a write can leave: temporary files, an image without its record
    missing = sorted(n for n in _expected_names(jobs) if n.endswith(".png") and n not in left)[0]
    (out / missing).write_bytes(b"not a png")
    (out / f".{missing}.partial-999999").write_bytes(b"half an image")
    (out / ".records.jsonl.partial-999999").write_bytes(b"{")
    assert _run_in_process(jobs, "--out", out, "--model", model) == 0
    _check_complete(jobs, out)


def test_malformed_lines_are_reported_and_skipped(model, tmp_path, capsys):
    good = [dict(task="text_to_image", prompt="the cat", seed=1, **SMALL),
            dict(task="text_to_image", prompt="a dog", seed=2, id="dog", **SMALL)]
    bad = (b'{"task": "text_to_image", "prompt": "oops", ',                    # line 3: not JSON
           b'{"task": "paint", "prompt": "the cat", "seed": 1}',               # line 4: unknown task
           b'{"task": "text_to_image", "prompt": "the cat"}',                  # line 5: no seed
           b'{"task": "text_to_image", "prompt": "the cat", "seed": "7"}',     # line 6: wrong type
           b'{"task": "text_to_image", "prompt": "the cat", "seed": 7, "steps": 3}',  # line 7: unknown key
           b'{"task": "text_to_image", "prompt": "x", "seed": 3, "id": "dog"}',       # line 8: duplicate id
           b'\xff\xfe',                                                         # line 9: not UTF-8
           b'',                                                                 # line 10: blank, ignored
           # line 11: passes the line check (steps <= 1000), fails to run (VD's schedule allows at most 999)
           b'{"task": "text_to_image", "prompt": "x", "seed": 9, "num_inference_steps": 1000, "height": 16}',
           b'{"task": "text_to_image", "prompt": "x", "seed": 9, "height": 30}',      # line 12: bad size
           b'{"task": "image_variation", "image": "", "seed": 9}')                    # line 13: no file name
    jobs = _write_jobs(tmp_path, good, bad)
    assert _run_in_process(jobs, "--out", tmp_path / "out", "--model", model) == 1
    captured = capsys.readouterr()
    for line, reason in [(3, "not valid JSON"), (4, "task: expected one of"), (5, "missing key(s): seed"),
                         (6, "seed: expected an integer, got '7'"), (7, "unknown key(s) for text_to_image: steps"),
                         (8, "duplicate id 'dog' (first on line 2)"), (9, "not UTF-8"),
                         (12, "height: expected a positive multiple of 8, got 30"),
                         (13, "image: expected a file name, got ''")]:
        assert f"jobs.jsonl:{line}: skipped: {reason}" in captured.err
        assert f"malformed: line {line}: {reason}" in captured.out
    assert "line 10" not in captured.out
    assert "failed: line 11" in captured.out and "num_inference_steps" in captured.out and "<= 999" in captured.out
    assert "3 jobs: 2 done, 0 skipped" in captured.out and "1 failed; 9 malformed line(s)" in captured.out
    assert {r["id"] for r in _records(tmp_path / "out")} == {"dog", read_jobs(jobs)[0][0].id}


def test_batches_do_not_depend_on_what_is_finished(tmp_path):
    jobs, _ = read_jobs(_write_jobs(tmp_path, JOBS))
    batches = make_batches(jobs, 2)
    assert [[j.line for j in b] for b in batches] == [[1, 7], [2], [3], [4], [5], [6], [8]]
    assert [[j.line for j in b] for b in make_batches(jobs, 1)] == [[i] for i in range(1, 9)]


def test_batches_stay_within_the_pixel_budget(tmp_path):
    """Jobs each within the facade's per-call pixel budget never share a call that would exceed it (such a call
    would be refused and every job rerun alone): 40 images of 512 x 512 per job, two jobs are 20.9 M pixels, over
    vd.checks.MAX_PIXELS (16.8 M)."""
    from vd.checks import MAX_PIXELS
    big = [dict(task="text_to_image", prompt=f"a {i}", seed=i, num_images_per_prompt=40) for i in range(3)]
    small = [dict(task="text_to_image", prompt=f"b {i}", seed=i, height=64, width=64) for i in range(3)]
    jobs, _ = read_jobs(_write_jobs(tmp_path, big + small))
    batches = make_batches(jobs, 4)
    assert [[j.line for j in b] for b in batches] == [[1], [2], [3], [4, 5, 6]]
    assert all(sum(j.pixels for j in b) <= MAX_PIXELS for b in batches)


def test_scheduler_settings_per_job(model, tmp_path):
    """A job's scheduler_config: settings over the model's scheduler_config.json for that job's calls only, as
    `pipe.scheduler_config = {**pipe.scheduler_config, **settings}` around them; the next job has the model's."""
    settings = {"timestep_spacing": "trailing", "solver_order": 3}
    jobs = [dict(task="text_to_image", prompt="the cat", seed=1, scheduler="dpmpp_2m", scheduler_config=settings,
                 num_images_per_prompt=2, **SMALL),
            dict(task="text_to_image", prompt="the cat", seed=1, scheduler="dpmpp_2m", **SMALL)]
    path = _write_jobs(tmp_path, jobs)
    assert _run_in_process(path, "--out", tmp_path / "out", "--model", model, "--batch-size", 2) == 0
    parsed, _ = read_jobs(path)
    assert parsed[0].alone and parsed[0].args["scheduler_config"] == settings
    pipe = VersatileDiffusion.from_pretrained(model)
    model_settings, pngs = pipe.scheduler_config, []
    for job in parsed:
        pipe.scheduler_config = {**model_settings, **job.args.get("scheduler_config", {})}
        args = {k: v for k, v in job.args.items() if k != "scheduler_config"}
        for k, name in enumerate(job.names):
            want = pipe.text_to_image(**dict(args, num_images_per_prompt=1), output_type="np", progress=False,
                                      generator=torch.Generator().manual_seed(job.seed + k)).images[0]
            pngs.append(np.asarray(PIL.Image.open(tmp_path / "out" / f"{name}.png"), dtype=np.float32) / 255)
            assert np.abs(pngs[-1] - want).max() <= 0.5 / 255 + 1e-5, name
    assert not np.array_equal(pngs[0], pngs[2])  # same seed and prompt, other settings


def test_scheduler_settings_checked_with_the_line(tmp_path):
    plain = dict(task="text_to_image", prompt="a cat", seed=3)
    lines = [dict(plain, scheduler_config={"clip_sample": "no"}), dict(plain, scheduler_config=["trailing"]),
             dict(plain, scheduler="unipc", scheduler_config={"predict_x0": False}), dict(plain, scheduler_config=None),
             dict(plain, scheduler="ddim_inverse")]
    jobs, bad = read_jobs(_write_jobs(tmp_path, lines))
    assert bad == [(1, "scheduler_config: clip_sample: expected true or false for DDIM, got 'no'"),
                   (2, "scheduler_config: expected an object, got ['trailing']"),
                   (3, "scheduler_config: predict_x0=False needs final_sigmas_type 'sigma_min' for UniPC: ending at "
                       "sigma 0, its last step multiplies 0 by an infinite h and gives NaN (as in diffusers)"),
                   (5, "scheduler: expected a sampler that makes pictures or texts, or \"output_type\": \"latent\" "
                       "with it (DDIM inversion turns latents into noise), got 'ddim_inverse'")]
    (nulled,) = jobs  # null: as without the key
    (without,), _ = read_jobs(_write_jobs(tmp_path, [plain]))
    assert (nulled.id, nulled.args, nulled.digest) == (without.id, without.args, without.digest)


def test_null_is_the_python_default_where_that_is_none(tmp_path):
    """A record's arguments hold nulls (negative_prompt, height, scheduler, ...): as a job line they are the same
    job as without them (same id, arguments and digest), not malformed lines."""
    plain = dict(task="text_to_image", prompt="a cat", seed=3)
    nulls = dict(plain, negative_prompt=None, height=None, width=None, scheduler=None, latents=None)
    blend = dict(task="blend", images=["a.png"], seed=1)
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    for without, with_nulls in ((plain, nulls), (blend, dict(blend, prompt=None, masks=None))):
        (a,), _ = read_jobs(_write_jobs(tmp_path, [without]))
        (b,), malformed = read_jobs(_write_jobs(tmp_path, [with_nulls]))
        assert malformed == [] and (a.id, a.args, a.digest) == (b.id, b.args, b.digest)
    _, bad = read_jobs(_write_jobs(tmp_path, [dict(plain, prompt=None), dict(plain, guidance_scale=None)]))
    assert [line for line, _ in bad] == [1, 2]  # no default None there: still refused
