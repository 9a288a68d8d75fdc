"""Which base models a node can load, and which copy of each (issue 17, point 5): published with its LoRAs
(loras/assets.py, Store.publish_assets), shown by `renderfarm status` and the dashboard.

A copy is named by a fingerprint that costs no read of the weights, of the kind its source allows:
- "revision": a Hugging Face id, by the snapshot commit its local cache holds (exact: the hub's own name
  for that content);
- "standin": a stand-in, by its recipe version and seed (the stand-in is built from them, offline);
- "header": a local diffusers folder, by the sha256 of its model_index.json, every component's config and
  every weights file's name, size and safetensors header (tensor names, dtypes, shapes and offsets). This tells
  apart another architecture, dtype or quantization, and a truncated copy; it does not tell apart two
  trainings of the same architecture, which only a hash of all the weights would (gigabytes per model).
What the scheduler does with them: nothing yet. A job is routed by whether a node can load its model at all
(the record's `unloadable`); pinning a job to a copy, as LoRAs are pinned, is left to do.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from renderfarm.planning.catalog import Catalog

_HEADER_LIMIT = 100 * 2**20  # safetensors' own limit on its JSON header


def model_assets(catalog: Catalog, loadable: list[str]) -> dict[str, Any]:
    """model -> {"kind", "fingerprint", "source"} for each model this node can load; a model whose copy cannot be
    read ({"kind": "unreadable", "error"}) is listed with why, never raised."""
    out: dict[str, Any] = {}
    for name in loadable:
        entry = catalog.get(name)
        try:
            out[name] = fingerprint(entry)
        except OSError as exc:
            out[name] = {"kind": "unreadable", "error": f"{type(exc).__name__}: {exc}"}
    return out


def fingerprint(entry: Any) -> dict[str, Any]:
    if entry.standin:
        from renderfarm.actors.standins import STANDIN_RECIPE_VERSION, STANDIN_SEED

        text = f"standin {entry.family.name} recipe {STANDIN_RECIPE_VERSION} seed {STANDIN_SEED}"
        return {"kind": "standin", "fingerprint": hashlib.sha256(text.encode()).hexdigest()[:16], "source": None}
    source = str(entry.source)
    path = Path(source).expanduser()
    if path.is_dir():
        return {"kind": "header", "fingerprint": folder_digest(path), "source": str(path)}
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source, "model_index.json")
    if isinstance(found, str):  # .../snapshots/<commit>/model_index.json
        return {"kind": "revision", "fingerprint": Path(found).parent.name, "source": source}
    return {"kind": "unknown", "fingerprint": None, "source": source}  # fetched from the hub when first loaded


def folder_digest(folder: Path) -> str:
    """The "header" fingerprint of a diffusers folder (see the module docstring)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = path.relative_to(folder).as_posix()
        if path.suffix == ".json":
            digest.update(f"{rel}\0".encode() + path.read_bytes())
        elif path.suffix in (".safetensors", ".gguf", ".bin", ".pt", ".pth"):
            digest.update(f"{rel}\0{path.stat().st_size}\0".encode() + _header(path))
    return digest.hexdigest()[:16]


def _header(path: Path) -> bytes:
    if path.suffix != ".safetensors":
        return b""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return b""
        length = int.from_bytes(raw, "little")
        return f.read(min(length, _HEADER_LIMIT)) if length <= os.path.getsize(path) - 8 else b""
