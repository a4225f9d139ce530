"""`vd batch` against hostile job files and output folders: one bad job never stops the others, a damaged or
outdated record means "not finished", image paths stay in the job file's folder, concurrent runs keep each
other's temporary files, and output problems are one line with status 2."""

import errno
import functools
import json
import os
import pathlib
import socket

import numpy as np
import PIL.Image
import pytest


pytest.importorskip("diffusers")

from vd import VersatileDiffusion, checks  # noqa: E402
from vd.batch import main, read_jobs  # noqa: E402
from vd.jobs import Job  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
SMALL = dict(height=16, width=16, num_inference_steps=1)


def _jobs(folder: pathlib.Path, lines: list) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    PIL.Image.fromarray((rng.rand(40, 56, 3) * 255).astype(np.uint8)).save(folder / "in.png")
    PIL.Image.fromarray((rng.rand(64, 64, 3) * 255).astype(np.uint8)).save(folder / "big.png")
    raw = [line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines]
    (folder / "jobs.jsonl").write_bytes(b"\n".join(raw) + b"\n")
    return folder / "jobs.jsonl"


def _run(jobs, out, model, *extra) -> int:
    return main([str(jobs), "--out", str(out), "--model", str(model), "--no-progress", *map(str, extra)])


def test_one_bad_job_never_stops_the_others(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 2300)  # big.png (64 x 64) is a "decompression bomb" here
    t2i = dict(task="text_to_image", prompt="the cat", **SMALL)
    lines = [
        dict(t2i, seed=1),                                                        # 1: fine
        dict(t2i, seed=2, task={}),                                               # 2: unhashable task
        dict(t2i, seed=3, task=["x"]),                                            # 3
        b"[" * 100_000 + b"]" * 100_000,                                          # 4: nested too deeply
        dict(t2i, seed=5, num_images_per_prompt=10**12),                          # 5: beyond the pixel budget
        dict(t2i, seed=6, height=1048576, width=512),                             # 6
        dict(task="image_variation", image="big.png", seed=7, **SMALL),           # 7: decompression bomb
        dict(task="image_variation", image="/etc/passwd", seed=8, **SMALL),       # 8: outside the folder
        dict(task="image_variation", image="../in.png", seed=9, **SMALL),         # 9
        dict(t2i, seed=10, prompt="boom"),                                        # 10: fails while running
        dict(t2i, seed=11, guidance_scale=1e30),                                  # 11: non-finite for sure
        dict(task="image_variation", image="in.png", seed=12, **SMALL),           # 12: fine
        dict(t2i, seed=2**64 - 1, num_images_per_prompt=2),                       # 13: seed + 1 overflows
    ]
    jobs = _jobs(tmp_path, lines)
    real = VersatileDiffusion.text_to_image

    @functools.wraps(real)
    def cpu_out_of_memory(self, prompt, *a, **k):  # what torch raises when the CPU allocator gives up
        if "boom" in prompt:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real(self, prompt, *a, **k)
    monkeypatch.setattr(VersatileDiffusion, "text_to_image", cpu_out_of_memory)
    assert _run(jobs, tmp_path / "out", model) == 1
    out = capsys.readouterr().out
    for line, reason in [(2, "task: expected one of"), (3, "task: expected one of"), (4, "nested too deeply"),
                         (5, "16777216"), (6, "1048576"), (7, "DecompressionBomb"), (8, "--allow-any-path"),
                         (9, "outside the job file's folder"), (11, "guidance_scale"), (13, "seed")]:
        assert f"malformed: line {line}: " in out and reason in out.split(f"malformed: line {line}: ")[1], line
    assert "failed: line 10" in out and "DefaultCPUAllocator" in out
    assert "3 jobs: 2 done, 0 skipped" in out and "1 failed; 10 malformed line(s)" in out
    good = [j for j in read_jobs(jobs)[0] if j.line in (1, 12)]
    assert {r["id"] for r in map(json.loads, (tmp_path / "out" / "records.jsonl").read_text().splitlines())} == {
        j.id for j in good}
    # the failed job does not block a rerun either: it is tried again, the finished ones are skipped
    assert _run(jobs, tmp_path / "out", model) == 1
    assert "3 jobs: 0 done, 2 skipped" in capsys.readouterr().out


def test_text_jobs_within_the_text_budget(tmp_path):
    """A text job asks for at most vd.checks.MAX_TEXTS texts (one facade call), as an image job for at most
    MAX_PIXELS pixels."""
    lines = [dict(task="text_variation", prompt="a", seed=1, num_texts_per_prompt=checks.MAX_TEXTS),
             dict(task="image_to_text", image="in.png", seed=1, num_texts_per_prompt=checks.MAX_TEXTS + 1)]
    jobs, bad = read_jobs(_jobs(tmp_path, lines))
    assert [j.line for j in jobs] == [1]
    assert bad == [(2, f"num_texts_per_prompt x inputs (prompts or images): expected at most {checks.MAX_TEXTS} "
                       f"texts per call, got {checks.MAX_TEXTS + 1}; ask for fewer texts per call (output k of a job "
                       "is seeded with seed + k; split larger jobs)")]


def test_a_failed_batch_runs_again_job_by_job_reading_its_files_once(model, tmp_path, capsys, monkeypatch):
    t2i = dict(task="text_to_image", **SMALL)
    jobs = _jobs(tmp_path, [dict(t2i, prompt="the cat", seed=1), dict(t2i, prompt="boom", seed=2)])
    real_call, real_inputs, reads = VersatileDiffusion.text_to_image, Job.inputs, []

    @functools.wraps(real_call)
    def fails_with_boom(self, prompt, *a, **k):
        if "boom" in prompt:
            raise RuntimeError("boom")
        return real_call(self, prompt, *a, **k)
    monkeypatch.setattr(VersatileDiffusion, "text_to_image", fails_with_boom)
    monkeypatch.setattr(Job, "inputs", lambda job, *a: reads.append(job.line) or real_inputs(job, *a))
    assert _run(jobs, tmp_path / "out", model, "--batch-size", 2) == 1
    assert "failed: line 2" in capsys.readouterr().out
    assert sorted(reads) == [1, 2]  # the batch's call and the two calls alone share one read of each job's files
    assert [r["seed"] for r in map(json.loads, (tmp_path / "out" / "records.jsonl").read_text().splitlines())] == [1]


def test_allow_any_path(model, tmp_path, capsys):
    jobs = _jobs(tmp_path / "jobs", [dict(task="image_variation", image="../in.png", seed=1, **SMALL)])
    PIL.Image.open(jobs.parent / "in.png").save(tmp_path / "in.png")
    assert _run(jobs, tmp_path / "out", model) == 1
    assert _run(jobs, tmp_path / "out", model, "--allow-any-path") == 0
    assert "1 jobs: 1 done" in capsys.readouterr().out


def test_damaged_or_outdated_records_are_redone(model, tmp_path, capsys):
    lines = [dict(task="text_to_image", prompt="the cat", seed=s, id=f"job{s}", **SMALL) for s in range(4)]
    jobs, out = _jobs(tmp_path, lines), tmp_path / "out"
    assert _run(jobs, out, model) == 0
    first = (out / "job3-0.png").read_bytes()
    (out / "job0-0.json").write_text("")            # empty
    (out / "job1-0.json").write_text("{")           # not JSON
    (out / "job2-0.json").write_bytes(b"\xff\xfe")  # not UTF-8
    lines[3]["prompt"] = "a dog"                     # the job with id job3 is edited
    jobs = _jobs(tmp_path, lines)
    capsys.readouterr()
    assert _run(jobs, out, model) == 0
    assert "4 jobs: 4 done, 0 skipped" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["job0", "job1", "job2", "job3"]
    assert records[3]["arguments"]["prompt"] == "a dog" and (out / "job3-0.png").read_bytes() != first
    assert _run(jobs, out, model) == 0 and "4 jobs: 0 done, 4 skipped" in capsys.readouterr().out


def test_concurrent_runs_keep_each_others_temporary_files(model, tmp_path):
    jobs, out = _jobs(tmp_path, [dict(task="text_to_image", prompt="a", seed=1, **SMALL)]), tmp_path / "out"
    out.mkdir()
    host = socket.gethostname().replace("-", "_")
    live = [f".a-0.png.partial-{host}-{os.getppid()}",    # another run on this host, alive
            ".b-0.png.partial-otherhost-12345"]            # a run on another node, written just now
    dead = [f".c-0.png.partial-{host}-999999", ".d-0.json.partial-999999",  # killed runs (old names too)
            ".e-0.png.partial-otherhost-54321"]            # another node's, untouched for an hour
    for name in live + dead:
        (out / name).write_bytes(b"half")
    old = os.stat(out / dead[-1]).st_mtime - 3600
    os.utime(out / dead[-1], (old, old))
    assert _run(jobs, out, model) == 0
    left = {p.name for p in out.iterdir() if ".partial-" in p.name}
    assert left == set(live)


def test_output_problems_are_one_line(model, tmp_path, capsys, monkeypatch):
    jobs = _jobs(tmp_path, [dict(task="text_to_image", prompt="a", seed=1, **SMALL)])
    (tmp_path / "file").write_text("x")
    for out, words in [(tmp_path / "file", ["file", "is a file"]), (tmp_path / "file" / "out", ["file", "out"])]:
        assert _run(jobs, out, model) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("vd batch: error: --out: ") and "\n" not in err, err
        assert all(w in err for w in words), err
    # a read-only folder (as the OS refuses it; root ignores chmod): refused before the model loads
    real_open = open

    def read_only(path, *a, **k):
        if ".partial-" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **k)
    with monkeypatch.context() as m:
        m.setattr("builtins.open", read_only)
        m.setattr(VersatileDiffusion, "from_pretrained", lambda *a, **k: pytest.fail("loaded before the check"))
        assert _run(jobs, tmp_path / "ro", model) == 2
        err = capsys.readouterr().err.strip()
        assert "Permission denied" in err and "ro" in err and "\n" not in err
    # a full disk while writing: one line, status 2, no temporary file, nothing half-written
    real_write = pathlib.Path.write_bytes

    def full(self, data):
        if ".partial-" in self.name and self.name.endswith(f"-{os.getpid()}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)
    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    assert _run(jobs, tmp_path / "full", model) == 2
    err = capsys.readouterr().err.strip()
    assert "No space left on device" in err and "full" in err and "\n" not in err, err
    assert os.listdir(tmp_path / "full") == []
