"""The built-in allocation policies on small hand-made cases (pure, no I/O)."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budgets import Price
from budgets.learner import Weights, learn
from budgets.policy import (
    TIERS,
    Adaptive,
    LocalFirst,
    Menu,
    Need,
    Option,
    Outcome,
    Policy,
    Pool,
    Target,
    Tiered,
    Uniform,
    make_policy,
    policy_names,
)
from budgets.stats import Observation, Stats, cell_prefixes

LOCAL = Option("local", "local", 1, Price.of(0, 0))
STRONG = Option("strong", "remote", 4, Price.of("1", "4"))
MENU = Menu((STRONG, LOCAL), Stats(), default="local")
POLICIES: list[Policy] = [Uniform(), Tiered(), LocalFirst(), Adaptive()]


def history(*rows: tuple[Observation, int, int]) -> Stats:
    """Statistics as Redis would hold them after these observations (each repeated) and verdicts."""
    fields: Counter[str] = Counter()
    for seen, times, right in rows:
        for name, inc in seen.fields():
            fields[name] += inc * times
        for prefix in cell_prefixes(seen.endpoint, seen.difficulty, seen.tags):
            fields[prefix + "ok"] += right
            fields[prefix + "bad"] += times - right
    return Stats.from_fields(dict(fields))


pools = st.builds(
    Pool,
    tokens=st.one_of(st.none(), st.integers(0, 200_000)),
    nanos=st.one_of(st.none(), st.integers(0, 10**9)),
)
needs = st.lists(
    st.builds(Need, subtask_id=st.sampled_from("abcdefgh"), difficulty=st.integers(1, 5)),
    min_size=1, max_size=8, unique_by=lambda n: n.subtask_id,
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(pool=pools, wave=needs, later=st.integers(0, 5))
def test_no_policy_hands_out_more_than_the_pool(pool: Pool, wave: list[Need], later: int) -> None:
    for policy in POLICIES:
        grants = policy.split(pool, wave, pending_after=later, menu=MENU)
        assert [g.subtask_id for g in grants] == [n.subtask_id for n in wave]
        if pool.tokens is not None:
            assert sum(g.tokens or 0 for g in grants) <= pool.tokens
        if pool.nanos is not None:
            assert sum(g.nanos or 0 for g in grants) <= pool.nanos
        outcomes = [Outcome(n, "local", 512, 512, cut_short=True) for n in wave]
        more = policy.escalate(pool, outcomes, menu=MENU)
        if pool.tokens is not None:
            assert sum(g.tokens or 0 for g in more) <= pool.tokens
        if pool.nanos is not None:
            assert sum(g.nanos or 0 for g in more) <= pool.nanos


def test_tiers_follow_difficulty_and_shares_follow_tiers() -> None:
    wave = [Need(f"d{d}", d, prompt_tokens=0) for d in (1, 3, 4, 5)]
    grants = Tiered().split(Pool(tokens=None, nanos=None), wave, pending_after=0, menu=MENU)
    assert [g.max_output_tokens for g in grants] == [TIERS[1], TIERS[3], TIERS[4], TIERS[5]]
    shared = Tiered().split(Pool(100_000, 10**6), wave, pending_after=0, menu=MENU)
    assert [g.tokens for g in shared] == sorted(g.tokens for g in shared)  # type: ignore[type-var]
    assert shared[0].tokens is not None
    assert abs((shared[-1].tokens or 0) - 5 * shared[0].tokens) <= 5  # 2560 against 512


def test_uniform_splits_equally_and_never_escalates() -> None:
    grants = Uniform().split(
        Pool(9_000, None), [Need("a", 1), Need("b", 5)], pending_after=1, menu=MENU
    )
    assert [g.tokens for g in grants] == [3_000, 3_000]
    cut = Outcome(Need("a", 1), "local", 100, 100, cut_short=True)
    assert Uniform().escalate(Pool(None, None), [cut], menu=MENU) == []


def test_tiered_escalates_a_cut_reply_only_when_the_pool_pays() -> None:
    cut = Outcome(Need("a", 3, prompt_tokens=100), "strong", 1024, 1024, cut_short=True)
    price = STRONG.cost(input_tokens=100, output_tokens=2048)
    [grant] = Tiered().escalate(Pool(None, price), [cut], menu=MENU)
    assert (grant.max_output_tokens, grant.nanos, grant.endpoint) == (2048, price, "strong")
    assert Tiered().escalate(Pool(None, price - 1), [cut], menu=MENU) == []
    assert Tiered().escalate(Pool(2_000, None), [cut], menu=MENU) == []  # 100 + 2048 tokens
    second = Outcome(Need("a", 3, attempt=2), "strong", 2048, 2048, cut_short=True)
    assert Tiered().escalate(Pool(None, None), [second], menu=MENU) == []  # out of tries
    fine = Outcome(Need("a", 3), "strong", 1024, 10)
    assert Tiered().escalate(Pool(None, None), [fine], menu=MENU) == []


def test_local_first_starts_cheap_and_climbs_only_on_failure() -> None:
    grants = LocalFirst().split(Pool(None, None), [Need("a", 2)], pending_after=0, menu=MENU)
    assert grants[0].endpoint == "local"
    ok = Outcome(Need("a", 2, prompt_tokens=50), "local", 512, 40)
    empty = Outcome(Need("b", 2, prompt_tokens=50), "local", 512, 0, signals=frozenset({"empty"}))
    grants = LocalFirst().escalate(Pool(None, 10**9), [ok, empty], menu=MENU)
    assert [(g.subtask_id, g.endpoint) for g in grants] == [("b", "strong")]
    custom = LocalFirst(failure_signals=frozenset({"no-final"}))
    flagged = Outcome(Need("c", 2), "local", 512, 40, signals=frozenset({"no-final"}))
    assert [g.endpoint for g in custom.escalate(Pool(None, 10**9), [flagged], menu=MENU)] == [
        "strong"
    ]
    assert LocalFirst().escalate(Pool(None, 10**9), [flagged], menu=MENU) == []
    top = Outcome(Need("d", 2), "strong", 512, 0, signals=frozenset({"empty"}))
    assert LocalFirst().escalate(Pool(None, 10**9), [top], menu=MENU) == []  # nowhere higher
    assert LocalFirst().escalate(Pool(None, 1), [empty], menu=MENU) == []  # cannot pay


def test_adaptive_probes_cheap_first_then_leaves_an_endpoint_history_says_fails() -> None:
    need = Need("a", 3, prompt_tokens=100)
    fresh = Adaptive().split(Pool(None, 10**8), [need], pending_after=0, menu=MENU)
    assert fresh[0].endpoint == "local"
    fails = Observation("local", 3, (), asked=1024, used=300, cut_short=False, nanos=0)
    stats = history((fails, 20, 1))  # 1 right in 20
    learned = Menu(MENU.options, stats, "local")
    assert (
        Adaptive().split(Pool(None, 10**8), [need], pending_after=0, menu=learned)[0].endpoint
        == "strong"
    )


def test_adaptive_sizes_tiers_from_tokens_really_used() -> None:
    short = Observation("strong", 4, (), asked=2048, used=90, cut_short=False, nanos=1)
    stats = history((short, 30, 30))
    assert Adaptive().tier("strong", 4, Stats()) == TIERS[4]  # no history: the ladder
    assert Adaptive().tier("strong", 4, stats) < 200  # less idle reservation
    cut = Observation("strong", 4, (), asked=100, used=100, cut_short=True, nanos=1)
    cutting = history((cut, 30, 0))
    assert Adaptive().tier("strong", 4, cutting) > 1.25 * 100 * 2  # grows when cut short


def test_adaptive_spends_returned_money_on_the_worst_signals_first() -> None:
    def obs(endpoint: str, *signals: str, nanos: int = 0) -> Observation:
        return Observation(endpoint, 2, (), 512, 100, False, nanos, signals=signals)

    rows = [(obs("local", "calc-bad"), 2, 20), (obs("local", "clean"), 18, 20)]
    rows.append((obs("strong", nanos=500), 18, 20))
    fields: dict[str, float] = {}
    for step in range(20):  # every verdict, interleaved
        for seen, right, _times in rows:
            learn(fields, seen.features(), ok=step < right)
    stats = Stats(history(*((o, t, r) for o, r, t in rows)).cells, Weights.from_fields(fields))
    menu = Menu(MENU.options, stats, "local")
    tries = [
        Outcome(Need("x", 2, prompt_tokens=100), "local", 512, 100, signals=frozenset({"clean"})),
        Outcome(
            Need("y", 2, prompt_tokens=100), "local", 512, 100, signals=frozenset({"calc-bad"})
        ),
    ]
    policy = Adaptive(target=Target(cost_ratio=10))  # only the pool limits
    [first] = policy.escalate(Pool(None, 10**9), tries[1:], menu=menu)
    one = first.nanos or 0
    grants = policy.escalate(Pool(None, one), tries, menu=menu)
    assert [(g.subtask_id, g.endpoint) for g in grants] == [("y", "strong")]
    assert policy.escalate(Pool(None, one - 1), tries, menu=menu) == []


def test_policies_are_chosen_by_name() -> None:
    assert policy_names() == ["adaptive", "local-first", "tiered", "uniform"]
    assert all(make_policy(n).name == n for n in policy_names())
    with pytest.raises(ValueError, match="unknown allocation policy 'greedy'; choose one of"):
        make_policy("greedy")
