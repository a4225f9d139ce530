"""`python -m weights_convert SRC OUT [--dtype ...] [--tasks ...]` on the tiny diffusers folder: the output loads
and generates exactly what the source does, --tasks writes only the parts those tasks need, --dtype casts, and
the output appears atomically: a run terminated or killed midway leaves no output folder, and the temporary
folder of a killed run is swept by the next run."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import tiny_pipeline as tp

pytest.importorskip("diffusers")
from vd import VersatileDiffusion  # noqa: E402
from vd.tasks import TASK_PARTS  # noqa: E402
from weights_convert import ALL_PARTS, CheckpointError, open_checkpoint  # noqa: E402
from weights_convert.__main__ import main  # noqa: E402
from weights_convert.convert import convert  # noqa: E402
from helpers import REPO

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore:.*rescale already rescaled.*")
CALL = dict(prompt="the cat", num_inference_steps=2, output_type="np", progress=False)


@pytest.fixture(autouse=True)
def keep_sigterm_handler():
    """main() installs a SIGTERM handler; keep pytest's."""
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return tp.save(tp.build_components(seed=0), tmp_path_factory.mktemp("tiny") / "vd")


@pytest.fixture(scope="module")
def denoisers_only(src, tmp_path_factory):
    """The source without its CLIP and Optimus files: a converter that never imports transformers starts faster."""
    import shutil
    return shutil.copytree(src, tmp_path_factory.mktemp("unets") / "vd",
                           ignore=shutil.ignore_patterns("text_encoder", "image_encoder", "tokenizer",
                                                         "image_feature_extractor", "pretrained_pth",
                                                         "optimus_tokenizer"))


def _text_to_image(folder, **kw) -> np.ndarray:
    pipe = VersatileDiffusion.from_pretrained(folder, tasks=["text_to_image"], **kw)
    return pipe.text_to_image(**CALL, generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def expected(src):
    return _text_to_image(src)


def _cli(*args, driver: Path | None = None, **popen) -> subprocess.Popen:
    cmd = [sys.executable, str(driver)] if driver else [sys.executable, "-m", "weights_convert"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([*cmd, *map(str, args)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


HOST = socket.gethostname().replace("-", "_")  # temporary names: .NAME.partial-HOST-PID (vd.files)


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial-"))


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _st_dtypes(folder: Path) -> set[str]:
    found = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            found |= {st.get_slice(k).get_dtype() for k in st.keys()}
    return found


# ---- what it writes

def test_cli_converts_everything(src, tmp_path, expected, check):
    out = tmp_path / "converted"
    proc = _cli(src, out)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert stdout.strip() == str(out)
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "vd" and meta["parts"] == list(ALL_PARTS) and meta["dtype"] is None
    assert _files(out) == {"config.json", *(f"{p}.safetensors" for p in ALL_PARTS),
                           *(f"tokenizer/{f}" for f in _files(src / "tokenizer")),
                           *(f"optimus_tokenizer/{f}" for f in ("vocab.txt", "vocab.json", "merges.txt"))}
    assert _leftovers(out) == []
    assert _st_dtypes(out) == {"F32"}
    # every tensor is the source's, under the same name
    a, b = open_checkpoint(src), open_checkpoint(out)
    assert a.parts == b.parts
    for part in a.parts:
        ta, tb = a.load(part), b.load(part)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), part
    check(float(np.abs(_text_to_image(out) - expected).max()), 0.0, "converted vs source")
    pipe = VersatileDiffusion.from_pretrained(out, uncond_image="diffusers")  # all three tasks load
    assert pipe.components.image_encoder is not None and pipe.components.image_processor is not None


def test_cli_tasks_writes_only_their_parts(src, tmp_path, expected, check):
    out = tmp_path / "t2i"
    assert main([str(src), str(out), "--tasks", "text_to_image"]) == 0
    parts = ["image_unet.global", "image_unet.data", "text_unet.context", "vae.encoder", "vae.decoder", "text_encoder"]
    assert sorted(parts) == sorted(TASK_PARTS["text_to_image"])
    meta = json.loads((out / "config.json").read_text())
    assert meta["parts"] == parts
    assert sorted(meta["configs"]) == ["image_unet", "text_encoder", "text_unet", "vae"]
    assert {f for f in _files(out) if not f.startswith("tokenizer/")} == {"config.json",
                                                                           *(f"{p}.safetensors" for p in parts)}
    check(float(np.abs(_text_to_image(out) - expected).max()), 0.0, "text_to_image-only vs source")
    with pytest.raises(CheckpointError, match=r"image_unet\.context.*image_encoder.*image_variation"):
        VersatileDiffusion.from_pretrained(out, tasks=["image_variation"])


def test_folder_converted_by_an_earlier_version_loads(src, tmp_path, expected, check):
    """Converted folders written before UNetConfig.mid_block (`"mid_attention": true`, no time_scale_shift) load
    as they were: format_version 1 did not change."""
    out = tmp_path / "old"
    assert main([str(src), str(out), "--tasks", "text_to_image"]) == 0
    meta = json.loads((out / "config.json").read_text())
    for unet in ("image_unet", "text_unet"):
        d = meta["configs"][unet]
        assert d.pop("mid_block") == "cross_attention" and d.pop("time_scale_shift") is False
        d["mid_attention"] = True
    (out / "config.json").write_text(json.dumps(meta))
    check(float(np.abs(_text_to_image(out) - expected).max()), 0.0, "earlier converted folder vs source")
    d["mid_attention"] = "yes"
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"configs\.text_unet: mid_block: expected one of .*, got 'yes'"):
        VersatileDiffusion.from_pretrained(out, tasks=["text_to_image"])


def test_cli_dtype_fp16(src, tmp_path, expected, check):
    out = tmp_path / "fp16"
    assert main([str(src), str(out), "--dtype", "fp16", "--tasks", "image_variation"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "fp16"
    assert _st_dtypes(out) == {"F16"}
    a, b = open_checkpoint(src), open_checkpoint(out)
    for part in TASK_PARTS["image_variation"]:
        ta, tb = a.load(part), b.load(part)
        assert all(tb[k].dtype == torch.float16 and torch.equal(tb[k], ta[k].half()) for k in ta), part
    # converting back to fp32 is exact (fp16 -> fp32 loses nothing)
    back = tmp_path / "fp32"
    assert main([str(out), str(back), "--dtype", "fp32"]) == 0
    assert _st_dtypes(back) == {"F32"}
    assert json.loads((back / "config.json").read_text())["parts"] == list(TASK_PARTS["image_variation"])


def test_cli_errors(src, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    assert main([str(src), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([str(tmp_path / "nothing"), str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and _leftovers(tmp_path / "o") == []


# ---- output problems: one line naming the path, status 2 (130 for Ctrl-C), nothing half-written

def _one_line(capsys, *words) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert str(w) in err, (w, err)
    return err


def _fail_on(monkeypatch, error: BaseException, after: int = 0) -> None:
    """The converter's part writer raises `error` (as the OS would) on its call number `after`."""
    import weights_convert.convert as conv
    real, calls = conv.save_file, []

    def save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > after:
            raise error
        real(tensors, path, metadata=metadata)
    monkeypatch.setattr(conv, "save_file", save_file)


def test_output_location_is_checked_first(denoisers_only, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    cases = [(tmp_path / "file" / "out", ["file", "is not a folder"]),
             (tmp_path / "missing" / "out", ["missing", "does not exist"])]
    for out, words in cases:
        assert main([str(denoisers_only), str(out)]) == 2
        _one_line(capsys, *words)
    # a read-only folder: the temporary folder cannot be made (as the OS refuses it)
    import pathlib
    real_mkdir = pathlib.Path.mkdir

    def refuse(self, *a, **k):
        if self.name.startswith(".ro.partial-"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)
    monkeypatch.setattr(pathlib.Path, "mkdir", refuse)
    opened = []
    monkeypatch.setattr("weights_convert.convert.open_checkpoint", lambda *a, **k: opened.append(a))
    assert main([str(denoisers_only), str(tmp_path / "ro")]) == 2
    _one_line(capsys, tmp_path / "ro", "Permission denied")
    assert not opened  # refused before the source was even opened
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_long_name_fits_with_the_temporary_suffix(denoisers_only, tmp_path):
    out = tmp_path / ("n" * 250)  # the limit is 255 bytes: the temporary folder's name is shortened to fit
    assert main([str(denoisers_only), str(out)]) == 0
    assert os.listdir(tmp_path) == [out.name] and open_checkpoint(out).parts


@pytest.mark.parametrize("error,status,words", [
    (OSError(28, "No space left on device"), 2, ["No space left on device"]),
    (KeyboardInterrupt(), 130, ["interrupted"]),
])
def test_failure_midway_leaves_nothing(denoisers_only, tmp_path, capsys, monkeypatch, error, status, words):
    _fail_on(monkeypatch, error, after=1)
    out = tmp_path / "out"
    assert main([str(denoisers_only), str(out)]) == status
    _one_line(capsys, out, *words)
    assert os.listdir(tmp_path) == []


def test_two_converts_to_one_destination(denoisers_only, tmp_path, capsys, monkeypatch):
    """The other run finishes first (simulated: the destination appears while this one writes)."""
    out = tmp_path / "out"
    import weights_convert.convert as conv
    real = conv.save_file

    def other_run_finishes(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        if not out.exists():
            out.mkdir()
            (out / "config.json").write_text("{}")
    monkeypatch.setattr(conv, "save_file", other_run_finishes)
    assert main([str(denoisers_only), str(out)]) == 2
    _one_line(capsys, out, "already exists", "another run")
    assert os.listdir(out) == ["config.json"] and _leftovers(out) == []


def test_source_folder_with_a_symlink_loop(denoisers_only, tmp_path, capsys):
    import shutil
    src = shutil.copytree(denoisers_only, tmp_path / "src")
    shutil.rmtree(src / "vae")
    (src / "vae").symlink_to(src / "vae")  # a loop
    assert main([str(src), str(tmp_path / "out")]) == 2
    _one_line(capsys, src / "vae")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path / "out") == []


# ---- atomic output

DRIVER = textwrap.dedent("""
    # the converter's CLI, slowed down: it reports each part it wrote and then waits, so it can be hit midway
    import sys, time
    import weights_convert.convert as conv
    from weights_convert.__main__ import main

    real = conv.save_file

    def slow_save_file(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        print("wrote", path, flush=True)
        time.sleep(60)

    conv.save_file = slow_save_file
    sys.exit(main(sys.argv[1:]))
""")


def _start_slow(src, out, tmp_path) -> subprocess.Popen:
    driver = tmp_path / "slow_convert.py"
    driver.write_text(DRIVER)
    proc = _cli(src, out, driver=driver)
    line = proc.stdout.readline()
    if not line.startswith("wrote"):
        proc.kill()
        raise AssertionError(f"driver did not start converting: {line!r} {proc.stderr.read()}")
    # midway: one part written into the temporary folder, no output folder yet
    assert _leftovers(out) == [f".{out.name}.partial-{HOST}-{proc.pid}"]
    assert not out.exists()
    return proc


def test_sigterm_midway_leaves_nothing(denoisers_only, tmp_path):
    out = tmp_path / "out"
    proc = _start_slow(denoisers_only, out, tmp_path)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)  # (reads and closes its pipes)
    assert proc.returncode == 128 + signal.SIGTERM
    assert not out.exists()
    assert _leftovers(out) == []


def test_sigkill_midway_then_next_run_sweeps(denoisers_only, tmp_path):
    out = tmp_path / "out"
    proc = _start_slow(denoisers_only, out, tmp_path)
    proc.kill()
    proc.communicate(timeout=60)  # reaped (its pid is gone), its pipes closed
    assert not out.exists()
    stale = _leftovers(out)
    assert stale == [f".{out.name}.partial-{HOST}-{proc.pid}"]  # a SIGKILL cannot be cleaned up after...
    # ...but the next run sweeps it, and leaves alone the folder of a conversion that is still running
    live = out.parent / f".{out.name}.partial-{HOST}-{os.getppid()}"
    live.mkdir()
    ours = out.parent / f".{out.name}.partial-{os.getpid()}"  # an older run's name that had our pid (pids repeat)
    ours.mkdir()
    (ours / "junk.safetensors").write_bytes(b"junk")
    assert convert(denoisers_only, out) == out
    assert _leftovers(out) == [live.name]
    assert "junk.safetensors" not in _files(out)
    a, b = open_checkpoint(denoisers_only), open_checkpoint(out)
    assert a.parts == b.parts == tuple(p for p in ALL_PARTS if p.split(".")[0] in ("image_unet", "text_unet", "vae"))
    for part in a.parts:
        ta, tb = a.load(part), b.load(part)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), part
