"""What a submit checks against the farm's nodes: FarmView (their records, LoRAs and published settings, each
read once per batch) and the checks over a whole batch of valid specs (a model no node can load, a job that fits
no node). Moved out of client.py unchanged; FarmClient.submit_batch calls them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from renderfarm.cluster.store import Store
from renderfarm.errors import CorruptRecord
from renderfarm.jobs import JobSpec
from renderfarm.planning.catalog import Catalog
from renderfarm.planning.devices import device_from_record
from renderfarm.planning.fit import JobShape, NodeView, why_nothing_fits
from renderfarm.planning.measured import snapshot

__all__ = ["FarmView", "fits_nowhere", "loadability", "planning_only", "unrenderable"]


def loadability(records: list[dict[str, Any]], model: str) -> tuple[list[str], dict[str, str]]:
    """What the nodes' records say of `model`: (the nodes that list it as loadable, {node: why not} for those that
    say they cannot load it). Each worker writes both lists into its record (actors/worker.py); a record without
    them, or with them malformed, says nothing either way."""
    able, unable = [], {}
    for record in records:
        if not isinstance(record, dict):
            continue
        name = str(record.get("name"))
        why = record["unloadable"].get(model) if isinstance(record.get("unloadable"), dict) else None
        if isinstance(why, str) and why:
            unable[name] = why
        elif isinstance(record.get("loadable"), list) and model in record["loadable"]:
            able.append(name)
    return sorted(able), unable


def unrenderable(catalog: Catalog, specs: Sequence[JobSpec], records: list[dict[str, Any]]) -> list[str]:
    """One error per spec whose model no worker renders (a family the catalog lists for planning only),
    or that no registered node can load: each node reports in its record what it cannot load and why
    (actors/worker.py). A node that reports nothing, or does not know the model, might load it; with no
    node registered yet, only the catalog's word counts."""
    reports = []
    for record in records:
        unloadable = record.get("unloadable") if isinstance(record, dict) else None
        if not isinstance(unloadable, dict):
            return planning_only(catalog, specs)  # a node that might load anything: no refusal by nodes
        reports.append((str(record.get("name")), unloadable))
    errors = planning_only(catalog, specs)
    for i, spec in enumerate(specs if not errors else ()):
        whys = {name: unloadable.get(spec.model) for name, unloadable in reports}
        if whys and all(isinstance(why, str) for why in whys.values()):
            reasons = "; ".join(f"{name}: {why}" for name, why in sorted(whys.items()))
            errors.append(f"jobs[{i}]: model: no node of this farm can load {spec.model!r} ({reasons})")
    return errors


def planning_only(catalog: Catalog, specs: Sequence[JobSpec]) -> list[str]:
    return [f"jobs[{i}]: model: {spec.model!r} (family {family.name}) is listed for planning only: no "
            "worker renders it yet" for i, spec in enumerate(specs)
            if (family := catalog.get(spec.model).family).planning_only]


def fits_nowhere(store: Store, catalog: Catalog, specs: Sequence[JobSpec], records: list[dict[str, Any]]) -> list[str]:
    """One error per spec that no registered node (`records`) can run in any profile (the planner's reason).
    With no node registered yet, nothing can be judged and everything is accepted."""
    nodes = []
    for record in records:
        try:
            device = device_from_record(record)
        except CorruptRecord:  # one bad node record must not refuse every submit: judged without it
            store.count("malformed_node")
            continue
        if device is not None:
            nodes.append(NodeView(record["name"], device))
    if not nodes:
        return []
    measured, bad = snapshot(store.calibration_records())  # what nodes measured raises the estimates, never lowers them
    if bad:
        store.count("malformed_calibration", len(bad))
    errors = []
    for i, spec in enumerate(specs):
        if not catalog.get(spec.model).components:
            continue  # a model without component data cannot be planned: let the node try
        shape = JobShape(spec.model, spec.width, spec.height, spec.steps, spec.num_images, task=spec.task)
        reason = why_nothing_fits(shape, nodes, catalog, measured)
        if reason:
            errors.append(f"jobs[{i}]: {reason}")
    return errors


class FarmView:
    """What the farm's nodes hold, as a submit checks it: their records (read once, when first asked) and the
    LoRAs they published (loras/assets.py; read only when a spec has a LoRA to check)."""

    def __init__(self, store: Store):
        self.store = store
        self._records: list[dict[str, Any]] | None = None
        self._loras: Any = None
        self._models: Any = None
        self._webhook_private: bool | None = None

    def records(self) -> list[dict[str, Any]]:
        if self._records is None:
            self._records = self.store.nodes()
        return self._records

    def model_copies(self) -> Any:
        if self._models is None:
            from renderfarm.loras.assets import ModelCopies

            self._models = ModelCopies(self.records())
        return self._models

    def allow_private_webhooks(self) -> bool:
        """jobs.WebhookRules: the webhook_allow_private the head published (read once, only if a webhook is given)."""
        if self._webhook_private is None:
            self._webhook_private = self.store.published_settings().get("webhook_allow_private") is True
        return self._webhook_private

    def resolve(self, name: str, sha256: str | None, family: str) -> str | None:
        """jobs.LoraRules: the copy of LoRA `name` a job is pinned to (loras/assets.py FarmLoras.resolve)."""
        if self._loras is None:
            from renderfarm.loras.assets import FarmLoras

            self._loras = FarmLoras(self.store.assets())
        return self._loras.resolve(name, sha256, family)
