import json
import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from renderfarm.scheduler.fairness import FairShare, Queued

NOW = 100_000.0
TEAMS = ["a", "b", "c", "d"]


@st.composite
def job_lists(draw, min_priority=-5, max_priority=5, max_age=20_000, min_size=0):
    n = draw(st.integers(min_value=min_size, max_value=40))
    return [
        Queued(
            id=f"j{i}",
            team=draw(st.sampled_from(TEAMS)),
            priority=draw(st.integers(min_value=min_priority, max_value=max_priority)),
            created_at=NOW - draw(st.integers(min_value=0, max_value=max_age)),
            cost=draw(st.floats(min_value=0.1, max_value=100.0)),
        )
        for i in range(n)
    ]


fair_shares = st.builds(
    FairShare,
    weights=st.dictionaries(st.sampled_from(TEAMS), st.floats(min_value=0.1, max_value=10.0)),
    half_life_s=st.floats(min_value=1.0, max_value=1e5),
    aging_s=st.sampled_from([0.0, 60.0, 600.0, 3600.0]),
)


def charged(fs, usage):
    for team, cost in usage.items():
        fs.charge(team, cost, NOW - 500)
    return fs


usages = st.dictionaries(st.sampled_from(TEAMS), st.floats(min_value=0.0, max_value=1e4))


# priority first


@settings(max_examples=200, deadline=None)
@given(jobs=job_lists(), usage=usages)
def test_no_aging_every_higher_priority_job_precedes_every_lower_one(jobs, usage):
    fs = charged(FairShare(weights={"a": 3, "b": 0.5}, aging_s=0), usage)
    priorities = [j.priority for j in fs.order(jobs, NOW)]
    assert priorities == sorted(priorities, reverse=True)


def test_priority_beats_usage_and_weight():
    fs = FairShare(weights={"rich": 100.0}, aging_s=0)
    fs.charge("poor", 1e6, NOW)
    jobs = [Queued("r", "rich", 0, NOW - 10), Queued("p", "poor", 1, NOW)]
    assert [j.id for j in fs.order(jobs, NOW)] == ["p", "r"]


# weighted share


def test_weighted_share_three_to_one():
    fs = FairShare(weights={"A": 3.0, "B": 1.0})
    jobs = [Queued(f"{t}{i}", t, 0, NOW - 1 + i * 1e-3) for t in "AB" for i in range(400)]
    first = fs.order(jobs, NOW)[:100]
    assert abs(Counter(j.team for j in first)["A"] - 75) <= 1


def test_equal_weights_alternate_and_ties_go_to_the_older_head_then_team_name():
    fs = FairShare()
    jobs = [Queued("b0", "b", 0, NOW - 10), Queued("a0", "a", 0, NOW - 5), Queued("a1", "a", 0, NOW - 4),
            Queued("b1", "b", 0, NOW - 3)]
    assert [j.id for j in fs.order(jobs, NOW)] == ["b0", "a0", "a1", "b1"]  # at the 1-1 tie a1 is older than b1
    same_time = [Queued("y", "y", 0, NOW), Queued("x", "x", 0, NOW)]
    assert [j.id for j in fs.order(same_time, NOW)] == ["x", "y"]


def test_cost_counts_in_the_share():
    fs = FairShare()
    jobs = [Queued("big", "a", 0, NOW - 10, cost=100.0)] + [Queued(f"s{i}", "b", 0, NOW - 5 + i) for i in range(5)]
    assert [j.id for j in fs.order(jobs, NOW)] == ["big", "s0", "s1", "s2", "s3", "s4"]
    jobs = [Queued("a0", "a", 0, NOW - 10, cost=3.0), Queued("a1", "a", 0, NOW - 9, cost=3.0)]
    jobs += [Queued(f"b{i}", "b", 0, NOW - 5 + i) for i in range(4)]
    assert [j.id for j in fs.order(jobs, NOW)] == ["a0", "b0", "b1", "b2", "a1", "b3"]


def test_usage_matters_a_heavy_user_goes_after_a_fresh_team():
    fs = FairShare()
    fs.charge("heavy", 5000.0, NOW - 60)
    jobs = [Queued("h0", "heavy", 0, NOW - 100), Queued("h1", "heavy", 0, NOW - 90), Queued("f0", "fresh", 0, NOW)]
    assert [j.id for j in fs.order(jobs, NOW)] == ["f0", "h0", "h1"]


def test_weight_scales_usage():
    fs = FairShare(weights={"big": 10.0})
    fs.charge("big", 50.0, NOW)
    fs.charge("small", 10.0, NOW)  # virtual times: big 5, small 10
    jobs = [Queued("s", "small", 0, NOW - 100), Queued("b", "big", 0, NOW)]
    assert [j.id for j in fs.order(jobs, NOW)] == ["b", "s"]


def test_virtual_charges_carry_over_between_levels():
    fs = FairShare(aging_s=0)
    jobs = [Queued(f"a_hi{i}", "a", 1, NOW - 100 + i) for i in range(3)]
    jobs += [Queued("a_lo", "a", 0, NOW - 50), Queued("b_lo", "b", 0, NOW)]
    assert [j.id for j in fs.order(jobs, NOW)] == ["a_hi0", "a_hi1", "a_hi2", "b_lo", "a_lo"]


# usage and decay


def test_usage_halves_after_one_half_life():
    fs = FairShare(half_life_s=3600.0)
    fs.charge("a", 100.0, 0.0)
    assert fs.usage("a", 0.0) == 100.0
    assert fs.usage("a", 3600.0) == pytest.approx(50.0)
    assert fs.usage("a", 7200.0) == pytest.approx(25.0)
    fs.charge("a", 10.0, 3600.0)
    assert fs.usage("a", 3600.0) == pytest.approx(60.0)
    assert fs.usage("a", 7200.0) == pytest.approx(30.0)
    assert fs.usage("nobody", 0.0) == 0.0


def test_usage_does_not_grow_when_time_goes_backwards():
    fs = FairShare()
    fs.charge("a", 100.0, 1000.0)
    assert fs.usage("a", 0.0) == 100.0
    fs.charge("a", 1.0, 500.0)
    assert fs.usage("a", 1000.0) == pytest.approx(101.0)


def test_infinite_half_life_never_decays():
    fs = FairShare(half_life_s=math.inf)
    fs.charge("a", 7.0, 0.0)
    assert fs.usage("a", 1e9) == 7.0


# aging


@pytest.mark.parametrize("k", [1, 3, 7])
def test_priority_zero_job_waiting_k_aging_periods_ranks_at_level_k(k):
    fs = FairShare(aging_s=600.0)
    old = Queued("old", "slow", 0, NOW - k * 600.0)
    assert fs.effective_priority(old, NOW) == k
    assert fs.effective_priority(Queued("x", "slow", 0, NOW - k * 600.0 + 1), NOW) == k - 1
    fs.charge("slow", 1e6, NOW)  # even a team far over its share
    fresh = [Queued(f"f{p}", "fast", p, NOW - 1) for p in range(-2, k)]
    assert fs.order(fresh + [old], NOW)[0] is old
    assert fs.order([Queued("top", "fast", k + 1, NOW), old], NOW)[0].id == "top"


def test_no_aging_when_aging_s_not_positive():
    for aging in (0.0, -5.0):
        assert FairShare(aging_s=aging).effective_priority(Queued("j", "t", 2, 0.0), NOW) == 2
    assert FairShare().effective_priority(Queued("j", "t", 2, NOW + 1e4), NOW) == 2  # future submit: no wait


@settings(max_examples=200, deadline=None)
@given(jobs=job_lists(min_size=1), aging=st.integers(min_value=1, max_value=3000), usage=usages)
def test_long_waiting_job_precedes_all_young_jobs(jobs, aging, usage):
    fs = charged(FairShare(weights={"a": 5, "c": 0.2}, aging_s=float(aging)), usage)
    max_priority = max(j.priority for j in jobs)
    old = [j for j in jobs if NOW - j.created_at > (max_priority - j.priority + 1) * aging]
    young = [j for j in jobs if NOW - j.created_at < aging]
    position = {j.id: i for i, j in enumerate(fs.order(jobs, NOW))}
    for o in old:
        assert all(position[o.id] < position[y.id] for y in young)


# general properties


@settings(max_examples=200, deadline=None)
@given(fs=fair_shares, jobs=job_lists(), usage=usages)
def test_order_is_a_permutation_sorted_by_level_and_leaves_usage_alone(fs, jobs, usage):
    charged(fs, usage)
    before = fs.to_json()
    out = fs.order(jobs, NOW)
    assert sorted(j.id for j in out) == sorted(j.id for j in jobs)
    assert len(out) == len(jobs)
    levels = [fs.effective_priority(j, NOW) for j in out]
    assert levels == sorted(levels, reverse=True)
    assert fs.to_json() == before
    assert fs.order(jobs, NOW) == out  # deterministic


@settings(max_examples=200, deadline=None)
@given(fs=fair_shares, jobs=job_lists(), usage=usages)
def test_within_a_team_and_level_order_is_by_submit_time(fs, jobs, usage):
    charged(fs, usage)
    seen: dict[tuple[str, int], tuple[float, str]] = {}
    for j in fs.order(jobs, NOW):
        key = (j.team, fs.effective_priority(j, NOW))
        assert key not in seen or seen[key] <= (j.created_at, j.id)
        seen[key] = (j.created_at, j.id)


def test_order_accepts_empty_and_does_not_mutate_input():
    fs = FairShare()
    assert fs.order([], NOW) == []
    jobs = [Queued("b", "t", 0, NOW), Queued("a", "t", 0, NOW - 1)]
    copy = list(jobs)
    assert [j.id for j in fs.order(jobs, NOW)] == ["a", "b"]
    assert jobs == copy


# persistence


@settings(max_examples=200, deadline=None)
@given(usage=usages, half_life=st.floats(min_value=1.0, max_value=1e5))
def test_json_round_trip(usage, half_life):
    fs = charged(FairShare(half_life_s=half_life), usage)
    data = json.loads(json.dumps(fs.to_json(), allow_nan=False))
    other = FairShare(half_life_s=half_life)
    other.charge("stale", 5.0, 0.0)  # replaced, not merged
    other.load_json(data)
    assert other.to_json() == fs.to_json()
    for team in TEAMS + ["stale"]:
        assert other.usage(team, NOW + 1000) == fs.usage(team, NOW + 1000)


def test_to_json_shape():
    fs = FairShare()
    fs.charge("a", 2.0, 10.0)
    assert fs.to_json() == {"usage": {"a": [2.0, 10.0]}}


@pytest.mark.parametrize(
    "data, field",
    [
        ([], "mapping"),
        ("{}", "mapping"),
        ({}, "usage"),
        ({"usage": [["a", 1.0, 0.0]]}, "usage"),
        ({"usage": {1: [1.0, 0.0]}}, r"usage\[1\]"),
        ({"usage": {"a": 1.0}}, r"usage\['a'\]"),
        ({"usage": {"a": [1.0]}}, r"usage\['a'\]"),
        ({"usage": {"a": [1.0, 0.0, 0.0]}}, r"usage\['a'\]"),
        ({"usage": {"a": ["1", 0.0]}}, r"usage\['a'\]\[0\]"),
        ({"usage": {"a": [True, 0.0]}}, r"usage\['a'\]\[0\]"),
        ({"usage": {"a": [None, 0.0]}}, r"usage\['a'\]\[0\]"),
        ({"usage": {"a": [-1.0, 0.0]}}, r"usage\['a'\]\[0\]"),
        ({"usage": {"a": [math.nan, 0.0]}}, r"usage\['a'\]\[0\]"),
        ({"usage": {"a": [math.inf, 0.0]}}, r"usage\['a'\]\[0\]"),
        ({"usage": {"a": [1.0, math.nan]}}, r"usage\['a'\]\[1\]"),
        ({"usage": {"a": [1.0, -math.inf]}}, r"usage\['a'\]\[1\]"),
        ({"usage": {"a": [1.0, "now"]}}, r"usage\['a'\]\[1\]"),
    ],
)
def test_load_json_rejects_malformed_data_and_keeps_state(data, field):
    fs = FairShare()
    fs.charge("keep", 3.0, 0.0)
    before = fs.to_json()
    with pytest.raises(ValueError, match=field):
        fs.load_json(data)
    assert fs.to_json() == before


# validation


@pytest.mark.parametrize("w", [0, -1.0, math.nan, math.inf, "2", True, None])
def test_bad_weight_names_the_team(w):
    with pytest.raises(ValueError, match="render-team"):
        FairShare(weights={"ok": 1.0, "render-team": w})


@pytest.mark.parametrize("kwargs, name", [
    ({"default_weight": 0}, "default_weight"),
    ({"default_weight": math.nan}, "default_weight"),
    ({"half_life_s": 0}, "half_life_s"),
    ({"half_life_s": -3600.0}, "half_life_s"),
    ({"half_life_s": math.nan}, "half_life_s"),
    ({"aging_s": math.nan}, "aging_s"),
])
def test_bad_parameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FairShare(**kwargs)


@pytest.mark.parametrize("cost", [0, 0.0, -1.0, math.nan, math.inf, "1", None])
def test_bad_cost_names_the_job(cost):
    with pytest.raises(ValueError, match="job-42"):
        Queued("job-42", "t", 0, NOW, cost=cost)


@pytest.mark.parametrize("kwargs", [{"priority": 1.5}, {"priority": True}, {"created_at": math.nan}])
def test_bad_job_fields_name_the_job(kwargs):
    fields = {"id": "job-7", "team": "t", "priority": 0, "created_at": NOW, **kwargs}
    with pytest.raises(ValueError, match="job-7"):
        Queued(**fields)


@pytest.mark.parametrize("cost", [-1.0, math.nan, math.inf])
def test_bad_charge(cost):
    fs = FairShare()
    with pytest.raises(ValueError, match="cost"):
        fs.charge("a", cost, NOW)
    assert fs.to_json() == {"usage": {}}


def test_error_messages_are_one_line():
    for make in (lambda: FairShare(weights={"x": -1}), lambda: Queued("j", "t", 0, NOW, cost=0),
                 lambda: FairShare().load_json({"usage": {"a": [1, math.nan]}})):
        with pytest.raises(ValueError) as err:
            make()
        assert "\n" not in str(err.value)
