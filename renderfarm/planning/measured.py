"""Online calibration: what the nodes measured, as floors under the planner's predictions.

After every batch a worker reports the peak it measured for (model, profile, size bucket, batch) and the
seconds per step it took on that node. The records live in Redis under the field names
cluster/keys.py builds (`peak_field`, `speed_field`) and survive restarts; this module is the pure side: the
rules that turn records into numbers the planner uses.

- Peaks are floors. A profile's estimate is never below the highest peak measured for it at this size bucket
  and a batch no larger than this one, plus `MEASURED_MARGIN_GIB`. Peaks only grow with the batch and the
  size, so a peak measured at a smaller batch (or a smaller size in the same bucket) is a valid floor.
- Speeds replace predictions: the finish-time score uses a node's measured seconds per step for the exact
  (model, size, batch) when it has one, else its measured rate per megapixel-step for the model scaled to the
  job, else the prediction.
- Load times replace predictions too. A worker reports, with a batch that loaded its model, the seconds the
  load took (reading the weights and placing them on the device); each speed record keeps a moving average of
  them and names the profile. The planner's figure for (node, model, profile) is the median over that node's
  `LOAD_RECORDS` most recently updated records of the model under the profile (one slow load, a cold page
  cache, does not decide it); without one, the node's figure for the model under any profile; then the same
  from the nodes of its kind (`kind_load_seconds`, the scheduler knows who they are); then the prediction
  from the weight bytes (scheduler/placement.py `load_seconds`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from renderfarm.cluster.keys import CALIB_SEP, size_bucket

MEASURED_MARGIN_GIB = 0.25  # above a measured peak: the same job can allocate a little differently next time
LOAD_RECORDS = 9  # the most recently updated load records of a (node, model, profile) whose median counts


def _median(values: Iterable[float]) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _profile_key(profile: object) -> str:
    """A recorded profile's name without its VAE mode (a VAE mode is a switch, not a load); "" for none."""
    return profile.rsplit("+vae-", 1)[0] if isinstance(profile, str) else ""


def _finite(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")
    return float(value)


@dataclass(frozen=True, eq=False)  # hashed by identity: a snapshot is a cache key for the planner
class Measurements:
    """A read-only snapshot of the farm's measurements.

    `peaks`: (model, bucket) -> {profile: ((batch, peak GiB), ...)}; `speeds`: (node, model, WxH, batch) ->
    seconds per step; `rates`: (node, model) -> seconds per megapixel-step (of one image); `loads`: (node,
    model, profile without its VAE mode, "" when unnamed) -> seconds a load takes (the median of recent
    records); `node_loads`: (node, model) -> the same over every profile.
    """

    peaks: Mapping[tuple[str, str], Mapping[str, tuple[tuple[int, float], ...]]] = field(default_factory=dict)
    speeds: Mapping[tuple[str, str, str, int], float] = field(default_factory=dict)
    rates: Mapping[tuple[str, str], float] = field(default_factory=dict)
    model_rates: Mapping[str, float] = field(default_factory=dict)  # model -> the mean rate over its nodes
    loads: Mapping[tuple[str, str, str], float] = field(default_factory=dict)
    node_loads: Mapping[tuple[str, str], float] = field(default_factory=dict)
    model_loads: Mapping[str, float] = field(default_factory=dict)  # model -> the median over its nodes

    @classmethod
    def from_records(
        cls, peaks: Iterable[tuple[str, Mapping]] = (), speeds: Iterable[tuple[str, Mapping]] = ()
    ) -> tuple[Measurements, list[str]]:
        """Build a snapshot from (field, record) pairs as stored; returns it and one line per record that did
        not parse (skipped, never fatal: a malformed record must not stop planning)."""
        bad: list[str] = []
        by_bucket: dict[tuple[str, str], dict[str, dict[int, float]]] = {}
        for key, record in peaks:
            try:
                model, profile, size, batch = key.split(CALIB_SEP)
                gib = _finite(record["peak_gib"], "peak_gib")
                per = by_bucket.setdefault((model, size), {}).setdefault(profile, {})
                per[int(batch)] = max(gib, per.get(int(batch), 0.0))
            except (ValueError, KeyError, TypeError) as exc:
                bad.append(f"peak {key!r}: {exc}")
        speed_map: dict[tuple[str, str, str, int], float] = {}
        rates: dict[tuple[str, str], list[float]] = {}
        loads: dict[tuple[str, str, str], list[tuple[float, float]]] = {}  # -> [(updated, load s)]
        for key, record in speeds:
            try:
                node, model, size, batch = key.split(CALIB_SEP)
                width, height = (int(v) for v in size.split("x"))
                per_step = _finite(record["s_per_step"], "s_per_step")
                speed_map[(node, model, size, int(batch))] = per_step
                megapixels = width * height * int(batch) / 1e6
                if per_step > 0 and megapixels > 0:
                    rates.setdefault((node, model), []).append(per_step / megapixels)
                if record.get("load_s") is not None:
                    updated = record.get("updated")
                    when = float(updated) if isinstance(updated, (int, float)) and math.isfinite(updated) else 0.0
                    loads.setdefault((node, model, _profile_key(record.get("profile"))), []).append(
                        (when, _finite(record["load_s"], "load_s")))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                bad.append(f"speed {key!r}: {exc}")
        node_rates = {k: sum(v) / len(v) for k, v in rates.items()}
        per_model: dict[str, list[float]] = {}
        for (_, model), rate in node_rates.items():
            per_model.setdefault(model, []).append(rate)
        recent = {k: [s for _, s in sorted(v, key=lambda r: r[0])[-LOAD_RECORDS:]] for k, v in loads.items()}
        any_profile: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for (node, model, _), records in loads.items():
            any_profile.setdefault((node, model), []).extend(records)
        node_loads = {k: _median(s for _, s in sorted(v, key=lambda r: r[0])[-LOAD_RECORDS:])
                      for k, v in any_profile.items()}
        per_model_loads: dict[str, list[float]] = {}
        for (_, model), seconds in node_loads.items():
            per_model_loads.setdefault(model, []).append(seconds)
        snapshot = cls(
            peaks={k: {p: tuple(sorted(b.items())) for p, b in v.items()} for k, v in by_bucket.items()},
            speeds=speed_map,
            rates=node_rates,
            model_rates={m: sum(v) / len(v) for m, v in per_model.items()},
            loads={k: _median(v) for k, v in recent.items()},
            node_loads=node_loads,
            model_loads={m: _median(v) for m, v in per_model_loads.items()},
        )
        return snapshot, bad

    def __bool__(self) -> bool:
        return bool(self.peaks or self.speeds or self.loads or self.node_loads)

    def floors(self, model: str, width: int, height: int, batch: int) -> dict[str, float]:
        """profile -> floor for every profile of `model` measured at this bucket and batch."""
        out = {}
        for profile, measured in self.peaks.get((model, size_bucket(width, height)), {}).items():
            peaks = [gib for b, gib in measured if b <= batch]
            if peaks:
                out[profile] = max(peaks) + MEASURED_MARGIN_GIB
        return out

    def seconds_per_step(self, node: str, model: str, width: int, height: int, batch: int) -> float | None:
        """What `node` measured for this job, exact or scaled from its rate for the model; None: unmeasured."""
        exact = self.speeds.get((node, model, f"{width}x{height}", batch))
        if exact is not None:
            return exact
        rate = self.rates.get((node, model))
        return rate * width * height * batch / 1e6 if rate is not None else None

    def farm_seconds_per_step(self, model: str, width: int, height: int, batch: int) -> float | None:
        """The farm's mean measured rate for `model` scaled to this job: the guess for a node that has not
        measured the model yet and has no prediction either (so it is tried, not shunned)."""
        rate = self.model_rates.get(model)
        return rate * width * height * batch / 1e6 if rate is not None else None

    def load_seconds(self, node: str, model: str, profile: str | None = None) -> float | None:
        """Seconds a load of `model` under `profile` (None: unknown) takes on `node`, as it measured: under
        that profile, else under any; None: it never loaded the model."""
        if profile is not None:
            exact = self.loads.get((node, model, _profile_key(profile)))
            if exact is not None:
                return exact
        return self.node_loads.get((node, model))

    def kind_load_seconds(self, nodes: Iterable[str], model: str, profile: str | None = None) -> float | None:
        """The median of what `nodes` (the nodes of one kind) measured loading `model` under `profile`, else
        under any profile; None: none of them loaded it."""
        nodes = list(nodes)
        if profile is not None:
            exact = _median(v for n in nodes if (v := self.loads.get((n, model, _profile_key(profile)))) is not None)
            if exact is not None:
                return exact
        return _median(v for n in nodes if (v := self.node_loads.get((n, model))) is not None)

    def farm_load_seconds(self, model: str) -> float | None:
        """The median of every node's figure for `model`: the guess for a model the planner cannot predict."""
        return self.model_loads.get(model)


EMPTY = Measurements()


def snapshot(records: tuple[Iterable, Iterable, list[str]]) -> tuple[Measurements, list[str]]:
    """A Measurements snapshot of `Store.calibration_records()`, and one line per record that did not parse."""
    peaks, speeds, bad = records
    measured, unparsed = Measurements.from_records(peaks, speeds)
    return measured, [*bad, *unparsed]
