"""The cheap round's fair order: `order(jobs, now, limit=k)` is exactly the first k of the whole order, whatever
the teams, weights, priorities, aging and usage (scheduler/fairness.py)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from renderfarm.scheduler.fairness import FairShare, Queued

TEAMS = ["a", "b", "c", "d"]

job_lists = st.lists(
    st.tuples(st.sampled_from(TEAMS), st.integers(-1, 2), st.floats(0, 5000), st.floats(0.1, 50)),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(job_lists, st.integers(0, 130), st.dictionaries(st.sampled_from(TEAMS), st.floats(0.5, 4)),
       st.lists(st.tuples(st.sampled_from(TEAMS), st.floats(0, 100)), max_size=6), st.sampled_from([0.0, 600.0]))
def test_a_limited_order_is_the_head_of_the_whole_order(specs, limit, weights, charges, aging):
    fair = FairShare(weights, half_life_s=3600, aging_s=aging)
    for team, cost in charges:
        fair.charge(team, cost, now=4000.0)
    jobs = [Queued(f"j{i}", team, priority, created, cost) for i, (team, priority, created, cost) in enumerate(specs)]
    whole = [j.id for j in fair.order(list(jobs), now=6000.0)]
    head = [j.id for j in fair.order(list(jobs), now=6000.0, limit=limit)]
    assert head == whole[:limit]
