"""Which LoRAs each node holds, and the farm's view of them (issue 17, point 5).

A node indexes its LoRA library (`library_for`: the `lora_dir` setting, a local folder or a studio share every
node mounts, else the stand-in LoRAs) when it starts and again every `LORA_RESCAN_S`, and publishes what it
holds, each LoRA with its family and content hash (`node_assets`), to Redis (Store.publish_assets: written when
it changes, its digest in the node's record). From those:
- the client pins each LoRA of a job to a copy's sha256 at submit (`FarmLoras.resolve`, the `LoraRules` of
  jobs.py): the newest copy the nodes hold, or the one the job names; a LoRA no node holds, or one made for
  another family, is refused at submit with the reason;
- the scheduler sends a job only to a node holding every LoRA of it at that hash (`held`): a node with another
  copy of the same name (stale, or changed since) is treated as lacking it.
Before any node has published (a queue filled ahead of its farm), nothing can be checked: names are kept
unpinned and any node holding the name takes the job.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from renderfarm.loras.library import HASH_CACHE_FILE, LoraLibrary, default_hash_cache

LORA_RESCAN_S = 30.0  # a node re-indexes its library this often (files added to a share show up within it)


def library_for(settings: Any, folder: str | Path | None = None) -> LoraLibrary:
    """The LoRA library in `folder` (a node's own, a command's --dir), else the one `settings` name
    (config.Settings `lora_dir`), else the stand-in LoRAs (built offline on first use); its hash cache beside the
    model cache."""
    folder = Path(folder).expanduser() if folder else settings.lora_dir
    if folder is None:
        from renderfarm.loras.standins import ensure_standin_loras

        folder = ensure_standin_loras(settings.cache_dir)
    hash_cache = settings.cache_dir / HASH_CACHE_FILE if settings.cache_dir else default_hash_cache()
    return LoraLibrary(folder, hash_cache=hash_cache)


def node_assets(library: LoraLibrary | None, models: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """Index `library` again: (what a node publishes, its digest). Each usable LoRA with its family, hash, rank,
    size and file time (the newest copy wins at submit); the files it cannot use, with why. A missing folder
    is reported as the node's problem, never raised: the node still renders plain jobs."""
    from renderfarm.loras.library import LoraError

    loras: dict[str, Any] = {}
    problems: dict[str, str] = {}
    folder_error: str | None = "no LoRA library" if library is None else None
    try:
        for info in library.scan() if library is not None else ():
            try:
                mtime = os.stat(info.path).st_mtime
            except OSError:
                continue  # gone since the scan
            loras[info.name] = {"family": info.family, "sha256": info.sha256, "short_hash": info.short_hash,
                                "size_bytes": info.size_bytes, "rank": info.rank, "style": info.style,
                                "components": list(info.components), "mtime": mtime}
        problems = {p.name: p.error for p in library.problems} if library is not None else {}
    except LoraError as exc:
        folder_error = str(exc)
    doc = {"lora_dir": str(library.folder) if library is not None else None, "loras": loras,
           "lora_problems": problems, "lora_dir_error": folder_error,
           # the base models it can load, each with its copy's fingerprint (actors/model_assets.py)
           "models": models or {}}
    # The digest leaves file times out: touching a file without changing it publishes nothing.
    stable = {**doc, "loras": {n: {k: v for k, v in e.items() if k != "mtime"} for n, e in loras.items()}}
    return doc, hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]


def held(assets: Mapping[str, Any] | None) -> frozenset[tuple[str, str]]:
    """The (name, sha256) of every LoRA a node's published assets say it holds; empty for none or garbage."""
    table = assets.get("loras") if isinstance(assets, Mapping) else None
    if not isinstance(table, Mapping):
        return frozenset()
    return frozenset((name, entry["sha256"]) for name, entry in table.items()
                     if isinstance(entry, Mapping) and isinstance(entry.get("sha256"), str))


def summary(assets: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a node's published assets say, for people (`renderfarm status`, the dashboard): its LoRAs as
    "name (short hash)", sorted, the files it cannot use with why, its library folder (with its error), and its
    base models as "name (kind fingerprint)"."""
    doc = assets if isinstance(assets, Mapping) else {}
    table = doc.get("loras") if isinstance(doc.get("loras"), Mapping) else {}
    problems = doc.get("lora_problems") if isinstance(doc.get("lora_problems"), Mapping) else {}
    models = doc.get("models") if isinstance(doc.get("models"), Mapping) else {}
    return {"loras": sorted(f"{name} ({entry.get('short_hash', '?')})" for name, entry in table.items()
                            if isinstance(entry, Mapping)),
            "models": sorted(f"{name} ({m.get('kind')} {m.get('fingerprint') or m.get('error') or '-'})"
                             for name, m in models.items() if isinstance(m, Mapping)),
            "lora_problems": {str(k): str(v) for k, v in problems.items()},
            "lora_dir": doc.get("lora_dir"), "lora_dir_error": doc.get("lora_dir_error")}


def model_fingerprints(record: Mapping[str, Any] | None) -> dict[str, str]:
    """model -> the fingerprint of the copy a node holds, from its record's `model_fingerprints` (models without
    one, and garbage, left out)."""
    table = record.get("model_fingerprints") if isinstance(record, Mapping) else None
    if not isinstance(table, Mapping):
        return {}
    return {model: fp for model, fp in table.items() if isinstance(model, str) and isinstance(fp, str)}


class ModelCopies:
    """Which copy of each model the farm's nodes hold, from their records (Store.nodes(): `model_fingerprints` is
    small, so it rides in the record every reader reads anyway): the copy a job is pinned to at submit."""

    def __init__(self, records: Sequence[Mapping[str, Any]]):
        self.models: dict[str, dict[str, list[str]]] = {}  # model -> fingerprint -> the nodes holding that copy
        for record in records:
            for model, fingerprint in model_fingerprints(record).items():
                self.models.setdefault(model, {}).setdefault(fingerprint, []).append(str(record.get("name")))

    def pin(self, model: str, wanted: str | None = None) -> str | None:
        """The copy of `model` a job is pinned to: `wanted` if some node holds it, else the copy most nodes hold
        (ties: the first fingerprint in order); None when no node published one (a hub model not yet fetched, or
        nodes that publish none). ValueError when no node holds `wanted`."""
        copies = self.models.get(model, {})
        if wanted is not None:
            if copies and wanted not in copies:
                held_copies = ", ".join(f"{fp} ({len(nodes)} nodes)" for fp, nodes in sorted(copies.items()))
                raise ValueError(f"no node holds {model} at fingerprint {wanted} (nodes hold {held_copies})")
            return wanted
        if not copies:
            return None
        return min(copies, key=lambda fp: (-len(copies[fp]), fp))


class FarmLoras:
    """The LoRAs a farm's nodes hold (`assets`: node name -> its published assets, Store.assets()), as the
    `LoraRules` that JobSpec.validate_for checks a job's LoRAs with."""

    def __init__(self, assets: Mapping[str, Mapping[str, Any]]):
        self.copies: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
        self.reported = False  # whether any node published a LoRA table at all
        for node, doc in sorted(assets.items()):
            table = doc.get("loras") if isinstance(doc, Mapping) else None
            if not isinstance(table, Mapping):
                continue
            self.reported = True
            for name, entry in table.items():
                if isinstance(entry, Mapping) and isinstance(entry.get("sha256"), str):
                    self.copies.setdefault(name, []).append((node, entry))

    def resolve(self, name: str, sha256: str | None, family: str) -> str | None:
        """The sha256 a job's LoRA `name` is pinned to: `sha256` if some node holds that copy, else the newest
        copy's. ValueError (its message names the LoRA and why) when no node holds it, or it is made for
        another family than the job's model. Before any node reported, `sha256` as given (None: unchecked)."""
        if not self.reported:
            return sha256
        copies = self.copies.get(name)
        if not copies:
            known = sorted(self.copies)
            listed = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
            raise ValueError(f"no node of this farm holds LoRA {name!r} (nodes hold: {listed or 'none'})")
        families = {entry.get("family") for _, entry in copies}
        if family not in families:
            made = " or ".join(sorted(str(f) for f in families))
            raise ValueError(f"LoRA {name!r} is made for {made} models, not {family}")
        if sha256 is not None:
            if not any(entry["sha256"] == sha256 for _, entry in copies):
                held_hashes = ", ".join(sorted({entry["sha256"][:12] for _, entry in copies}))
                raise ValueError(f"no node holds LoRA {name!r} with sha256 {sha256[:12]}... (nodes hold {held_hashes})")
            return sha256
        newest = max(copies, key=lambda c: (float(c[1].get("mtime") or 0.0), c[1]["sha256"]))
        return str(newest[1]["sha256"])

    def holders(self, name: str, sha256: str | None) -> list[str]:
        """The nodes holding LoRA `name` (at `sha256`, when given)."""
        return [node for node, entry in self.copies.get(name, ()) if sha256 is None or entry["sha256"] == sha256]
