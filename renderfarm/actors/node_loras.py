"""A node's LoRAs: the library it indexes and publishes (loras/assets.py), and the files a job's LoRA set names.

The node indexes its library (`lora_dir`, else the stand-in LoRAs) at start and every LORA_RESCAN_S, and
publishes what it holds when that changed; a job names each LoRA by name and the sha256 it was pinned to at
submit, and `resolve` finds the file of exactly that copy (a file changed since is another copy: the job is
refused here, as the scheduler would not have sent it had it known).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from renderfarm.cluster.store import Store
from renderfarm.config import Settings

log = logging.getLogger(__name__)


class MissingLora(LookupError):
    """A job's LoRA this node does not hold at the job's hash: the job's fault only if no node holds it, which
    the client checks at submit; here it means the node's library changed after the job was routed."""


class NodeLoras:
    def __init__(self, node: str, settings: Settings, lora_dir: str | None = None,
                 models: Callable[[], dict[str, Any]] = dict):
        """`lora_dir`: the node's own library folder (NodeDeclaration.lora_dir), else the farm's. `models`: the
        base models it can load, each with its copy's fingerprint (actors/model_assets.py), published with them."""
        self.node = node
        self.models = models
        self.model_fingerprints: dict[str, str] = {}  # model -> its copy's fingerprint (the node record carries it)
        self.version: str | None = None  # the digest of what was published last
        self._due = 0.0
        self.applied: dict[str, list[list[Any]]] = {}  # model -> [[name, sha256, weight], ...] (the node record)
        self.library: Any = None
        try:
            from renderfarm.loras.assets import library_for

            self.library = library_for(settings, lora_dir)
        except Exception as exc:  # a broken library costs the LoRA jobs, never the node
            log.error("node %s: no LoRA library: %s", node, exc)

    def due(self) -> bool:
        return time.monotonic() >= self._due

    def publish(self, store: Store) -> None:
        """Index the library; publish what it holds if that changed. Never raises (Redis away, a share gone:
        the next rescan tries again)."""
        from renderfarm.loras.assets import LORA_RESCAN_S, node_assets

        self._due = time.monotonic() + LORA_RESCAN_S
        try:
            models = self.models()
            self.model_fingerprints = {m: e["fingerprint"] for m, e in models.items() if e.get("fingerprint")}
            doc, version = node_assets(self.library, models)
            if version != self.version:
                store.publish_assets(self.node, doc, version)
                self.version = version
        except Exception:
            log.warning("node %s: could not publish its LoRAs", self.node, exc_info=True)

    def resolve(self, name: str, sha256: str | None) -> Any:
        """The library's LoraInfo of `name` at `sha256` (any copy when None); MissingLora when it holds none."""
        from renderfarm.loras.library import LoraError

        if self.library is None:
            raise MissingLora(f"node {self.node} has no LoRA library, so no LoRA {name!r}")
        try:
            info = self.library.get(name)
        except LoraError as exc:
            self._due = 0.0  # the library changed since it was published: publish again at the next heartbeat
            raise MissingLora(f"node {self.node}: {exc}") from None
        if sha256 is not None and info.sha256 != sha256:
            self._due = 0.0
            raise MissingLora(f"node {self.node} holds another copy of LoRA {name!r} (sha256 {info.sha256[:12]}, "
                              f"the job was pinned to {sha256[:12]})")
        return info

    def apply(self, pipe: Any, entry: Any, profile: Any, loras: tuple[tuple[str, str | None, float], ...]) -> Any:
        """Switch `pipe` (of `entry`, under `profile`) to the job's LoRA set (JobSpec.lora_set()), in the mode the
        profile allows (actors/lora_apply.py: fused into 16-bit weights, unmerged elsewhere); the empty set is
        the base model. Returns (lora_apply.AppliedTimings, the (name, weight, short hash) of each LoRA for the
        infotext). A LoRA this node lacks at the job's hash raises MissingLora."""
        from renderfarm.actors.lora_apply import apply

        infos = [(self.resolve(name, sha), weight) for name, sha, weight in loras]
        timings = apply(pipe, entry, profile, tuple(infos))
        self.applied[entry.name] = [[info.name, info.sha256, weight] for info, weight in infos]
        return timings, tuple((info.name, weight, info.short_hash) for info, weight in infos)
