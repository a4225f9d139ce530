"""Test-wide settings, and the table of measured parity errors that ends a run (`pytest -q` shows it)."""

import os

import pytest
import torch

# The models in the suite are tiny: one thread is as fast, and it cannot be starved by other processes on a
# small machine (a second thread spinning for a busy core made some tests 20x slower). Subprocesses inherit it, and
# the tests that compare a subprocess's files with in-process results byte for byte need its arithmetic to be the
# same: MKL takes its own thread count from MKL_NUM_THREADS where a user's environment sets it.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
torch.set_num_threads(1)
# The Triton kernels are tested in Triton's CPU interpreter (tests/kernels). Whether a kernel is interpreted is
# fixed when triton and vd.kernels are imported, which diffusers, transformers or torch.compile may do from any
# test module: so it is set here, before all of them. Nothing else in the suite runs triton (there is no GPU).
os.environ["TRITON_INTERPRET"] = "1"

# (name, value, tol) of every check, gathered from the test reports: with pytest-xdist the checks run in worker
# processes, and only a report's user_properties travel back to the process that prints the table.
_MEASURED: list[tuple[str, float, float]] = []


@pytest.fixture
def check(request):
    """check(value, tol, what=""): assert value <= tol and record it for the end-of-run table."""

    def _check(value: float, tol: float, what: str = "") -> None:
        name = request.node.name + (f" {what}" if what else "")
        request.node.user_properties.append(("measured", (name, float(value), float(tol))))
        assert value <= tol, f"{name}: {value:.3e} > {tol:.1e}"

    return _check


@pytest.fixture
def loaded_parts(monkeypatch):
    """The checkpoint parts read (Checkpoint.load_parts, which Checkpoint.load goes through) while the test runs,
    in order."""
    from weights_convert import Checkpoint
    seen = []
    original = Checkpoint.load_parts

    def load_parts(self, parts, *args, **kwargs):
        seen.extend(parts)
        return original(self, parts, *args, **kwargs)
    monkeypatch.setattr(Checkpoint, "load_parts", load_parts)
    return seen


@pytest.fixture
def patched_dual(monkeypatch):
    """The smallest patch that lets diffusers 0.42.1's dual pipeline run: its callers pass
    a keyword its DualTransformer2DModel.forward refuses; accept and drop it."""
    from diffusers.models import DualTransformer2DModel
    original = DualTransformer2DModel.forward

    def forward(self, hidden_states, encoder_hidden_states, encoder_attention_mask=None, **kwargs):
        return original(self, hidden_states, encoder_hidden_states, **kwargs)
    monkeypatch.setattr(DualTransformer2DModel, "forward", forward)


def pytest_runtest_logreport(report):
    if report.when == "teardown":  # every phase's report carries all of the test's properties: take the last
        _MEASURED.extend(tuple(value) for key, value in report.user_properties if key == "measured")


def pytest_terminal_summary(terminalreporter):
    if not _MEASURED:
        return
    terminalreporter.section("measured parity errors")
    for name, value, tol in _MEASURED:
        terminalreporter.write_line(f"{value:10.3e}  (tol {tol:.0e})  {name}")
