"""Readers for the real checkpoints' key/shape lists in tests/data/manifests (copied from shared/manifests)."""

from pathlib import Path

MANIFESTS = Path(__file__).parent / "data" / "manifests"


def read_manifest(name: str) -> dict[str, tuple[int, ...]]:
    """`key<TAB>shape` lines (shape like 320x4x3x3, or `scalar`) -> {key: shape}; `#` lines are comments."""
    out = {}
    for line in (MANIFESTS / f"{name}.tsv").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        out[key] = () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))
    return out


def read_mapping(name: str) -> list[list[str]]:
    """Rows of mappings/<name>.tsv (tab-separated columns, `#` lines skipped)."""
    rows = []
    for line in (MANIFESTS / "mappings" / f"{name}.tsv").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            rows.append(line.split("\t"))
    return rows
