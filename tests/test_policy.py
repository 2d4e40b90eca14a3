"""Allocation policies and statistics values, pure: small hand-made cases and properties."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from decimal import Decimal

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from budgets import Price
from budgets.errors import InvalidName
from budgets.learner import Weights, learn
from budgets.policy import (
    FAILURE_SIGNALS,
    TIERS,
    Adaptive,
    Grant,
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
from budgets.stats import (
    ANY_DIFFICULTY,
    ANY_TAG,
    Cell,
    Observation,
    Stats,
    bucket_bound,
    bucket_of,
    cell_prefixes,
    clean_tag,
)

LOCAL = Option("local", "local", 1, Price.of(0, 0))
MID = Option("mid", "remote", 2, Price.of("0.1", "0.4"))
STRONG = Option("strong", "remote", 4, Price.of("1", "4"))
MENU = Menu((STRONG, MID, LOCAL), Stats(), default="local")
PAIR = Menu((STRONG, LOCAL), Stats(), default="local")
UNLIMITED = Pool(tokens=None, nanos=None)
RICH = Pool(tokens=None, nanos=10**12)
POLICIES: list[Policy] = [Uniform(), Tiered(), LocalFirst(), Adaptive()]
#: Adaptive with a target that never binds: what the pool and the gains alone decide.
OPEN = Adaptive(target=Target(cost_ratio=10))


def history(*rows: tuple[Observation, int, int]) -> Stats:
    """Stats as Redis holds them after each observation ``times`` times, ``right`` of them ok."""
    fields: Counter[str] = Counter()
    for seen, times, right in rows:
        assert 0 <= right <= times
        for name, inc in seen.fields():
            fields[name] += inc * times
        for prefix in cell_prefixes(seen.endpoint, seen.difficulty, seen.tags):
            fields[prefix + "ok"] += right
            fields[prefix + "bad"] += times - right
    return Stats.from_fields(dict(fields))


def seen(
    endpoint: str,
    difficulty: int,
    *tags: str,
    asked: int = 512,
    used: int = 100,
    cut: bool = False,
    nanos: int = 0,
    signals: Sequence[str] = (),
) -> Observation:
    return Observation(endpoint, difficulty, tags, asked, used, cut, nanos, signals=tuple(signals))


def taught(*rows: tuple[Observation, int, int]) -> Stats:
    """:func:`history`, and a learner that took every verdict of it (rows interleaved)."""
    fields: dict[str, float] = {}
    left: list[list[str | int]] = [
        [seen.features(), right, times - right] for seen, times, right in rows
    ]
    while any(ok or bad for _, ok, bad in left):
        for item in left:
            for index, verdict in ((1, True), (2, False)):
                if item[index]:
                    learn(fields, str(item[0]), ok=verdict)
                    item[index] = int(item[index]) - 1
    return Stats(history(*rows).cells, Weights.from_fields(fields))


def tried(
    sid: str,
    difficulty: int,
    endpoint: str,
    *,
    asked: int = 512,
    used: int = 100,
    cut: bool = False,
    signals: Sequence[str] = (),
    attempt: int = 1,
    prompt: int = 100,
) -> Outcome:
    need = Need(sid, difficulty, attempt=attempt, prompt_tokens=prompt)
    return Outcome(need, endpoint, asked, used, cut_short=cut, signals=frozenset(signals))


def totals(grants: Sequence[Grant]) -> tuple[int, int]:
    return sum(g.tokens or 0 for g in grants), sum(g.nanos or 0 for g in grants)


def assert_within(pool: Pool, grants: Sequence[Grant]) -> None:
    """Every grant is bounded where the pool is, and together they fit it."""
    tokens, nanos = totals(grants)
    if pool.tokens is not None:
        assert all(g.tokens is not None for g in grants)
        assert tokens <= pool.tokens
    if pool.nanos is not None:
        assert all(g.nanos is not None for g in grants)
        assert nanos <= pool.nanos


# -- the value types ------------------------------------------------------------


def test_pool_less_and_covers() -> None:
    pool = Pool(tokens=1_000, nanos=500)
    after = pool.less(Grant("a", 300, 200, 100))
    assert after == Pool(700, 300)
    assert pool.less(Grant("a", 5_000, 900, 100)) == Pool(0, 0)  # never below zero
    assert UNLIMITED.less(Grant("a", 300, 200, 100)) == UNLIMITED
    assert pool.covers(tokens=1_000, nanos=500)
    assert not pool.covers(tokens=1_001, nanos=0)
    assert not pool.covers(tokens=0, nanos=501)
    assert Pool(None, 0).covers(tokens=10**12, nanos=0)
    assert not Pool(None, 0).covers(tokens=0, nanos=1)


def test_options_rank_local_first_then_by_price() -> None:
    pricey_local = Option("big-local", "local", 3, Price.of("5", "5"))
    menu = Menu((STRONG, pricey_local, MID, LOCAL), Stats(), default="mid")
    assert [o.name for o in menu.by_cost()] == ["local", "big-local", "mid", "strong"]
    assert menu.option(None) is MID
    assert menu.option("strong") is STRONG
    assert menu.option("nowhere") is None
    assert STRONG.cost(input_tokens=1_000, output_tokens=1_000) == 5_000_000
    assert MID.cost(input_tokens=1, output_tokens=0) == 100


def test_outcome_tags_and_failure() -> None:
    out = Outcome(Need("a", 2, ("Math Word",)), "local", 512, 512, cut_short=True)
    assert out.tags == ("cut_short", "math-word")
    assert out.failed()
    for signal in FAILURE_SIGNALS:
        assert tried("a", 2, "local", signals=[signal]).failed()
    plain = tried("a", 2, "local", signals=["no-final"])
    assert not plain.failed()
    assert plain.failed(["no-final"])
    assert tried("a", 2, "local", signals=["cut_short"]).failed()


# -- budgets never exceed what is available -------------------------------------

NAMES = ["local", "mid", "strong", "other"]
TAGS = ["math", "code", "calc-bad", "clean", "cut_short", "empty"]
SIGNALS = ["empty", "rejected", "cut_short", "calc-bad", "clean", "no-final"]


@st.composite
def menus(draw: st.DrawFn) -> Menu:
    names = draw(st.lists(st.sampled_from(NAMES), min_size=0, max_size=4, unique=True))
    cents = st.integers(0, 4_000).map(lambda c: Decimal(c) / 100)
    options = tuple(
        Option(
            name,
            draw(st.sampled_from(["local", "remote"])),
            draw(st.integers(1, 6)),
            Price.of(draw(cents), draw(cents)),
        )
        for name in names
    )
    rows = []
    for _ in range(draw(st.integers(0, 6))):
        asked = draw(st.integers(0, 5_000))
        observation = Observation(
            endpoint=draw(st.sampled_from(NAMES)),
            difficulty=draw(st.integers(1, 5)),
            tags=tuple(draw(st.lists(st.sampled_from(TAGS), max_size=3))),
            asked=asked,
            used=draw(st.integers(0, asked)),
            cut_short=draw(st.booleans()),
            nanos=draw(st.integers(0, 10**7)),
        )
        times = draw(st.integers(1, 30))
        rows.append((observation, times, draw(st.integers(0, times))))
    default = draw(st.sampled_from([None, *names]))
    return Menu(options, history(*rows), default)


pools = st.builds(
    Pool,
    tokens=st.one_of(st.none(), st.integers(0, 3_000), st.integers(0, 300_000)),
    nanos=st.one_of(st.none(), st.integers(0, 50_000), st.integers(0, 10**8)),
)
waves = st.lists(
    st.builds(
        Need,
        subtask_id=st.sampled_from("abcdefgh"),
        difficulty=st.integers(0, 7),
        tags=st.lists(st.sampled_from(TAGS), max_size=2).map(tuple),
        attempt=st.integers(1, 4),
        prompt_tokens=st.integers(0, 3_000),
    ),
    min_size=1,
    max_size=6,
    unique_by=lambda n: n.subtask_id,
)


@st.composite
def outcomes_of(draw: st.DrawFn, wave: list[Need]) -> list[Outcome]:
    out = []
    for need in wave:
        asked = draw(st.integers(0, 4_096))
        out.append(
            Outcome(
                need,
                draw(st.sampled_from([*NAMES, "unknown"])),
                asked,
                draw(st.integers(0, asked)),
                cut_short=draw(st.booleans()),
                signals=frozenset(draw(st.lists(st.sampled_from(SIGNALS), max_size=2))),
            )
        )
    return out


ALL_POLICIES: list[Policy] = [
    *POLICIES,
    Tiered(max_attempts=4),
    LocalFirst(failure_signals=frozenset({"no-final"}), max_attempts=4),
    Adaptive(min_calls=1, min_gain=0.0, probe_ratio=1.0),
]


@settings(max_examples=300, deadline=None)
@given(pool=pools, wave=waves, later=st.integers(0, 5), menu=menus(), data=st.data())
def test_no_policy_hands_out_more_than_the_pool(
    pool: Pool, wave: list[Need], later: int, menu: Menu, data: st.DataObject
) -> None:
    tries = data.draw(outcomes_of(wave))
    for policy in ALL_POLICIES:
        grants = policy.split(pool, wave, pending_after=later, menu=menu)
        assert [g.subtask_id for g in grants] == [n.subtask_id for n in wave]
        assert_within(pool, grants)
        for need, grant in zip(wave, grants, strict=True):
            assert grant.max_output_tokens >= 0
            if grant.tokens is not None:  # the output asked for fits next to the prompt
                assert grant.max_output_tokens <= max(0, grant.tokens - need.prompt_tokens)

        more = policy.escalate(pool, tries, menu=menu)
        assert_within(pool, more)
        ids = [g.subtask_id for g in more]
        assert len(ids) == len(set(ids))
        by_id = {t.need.subtask_id: t for t in tries}
        for grant in more:
            out = by_id[grant.subtask_id]
            assert out.need.attempt < getattr(policy, "max_attempts", 1)
            option = menu.option(grant.endpoint) if grant.endpoint is not None else None
            if option is not None:  # a priced call: the reservation is its full price
                prompt = out.need.prompt_tokens
                if grant.nanos is not None:
                    assert grant.nanos == option.cost(
                        input_tokens=prompt, output_tokens=grant.max_output_tokens
                    )
                if grant.tokens is not None:
                    assert grant.tokens == prompt + grant.max_output_tokens


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_explicit_pools_are_respected(policy: Policy) -> None:
    wave = [Need("a", 1), Need("b", 3), Need("c", 5)]
    for pool in (Pool(10_000, 1_000_000), Pool(7, 3), Pool(0, 0), Pool(None, 5), Pool(5, None)):
        grants = policy.split(pool, wave, pending_after=2, menu=MENU)
        assert_within(pool, grants)
        failed = [tried(n.subtask_id, n.difficulty, "local", cut=True) for n in wave]
        assert_within(pool, policy.escalate(pool, failed, menu=MENU))


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_unlimited_pools_give_unlimited_grants(policy: Policy) -> None:
    grants = policy.split(UNLIMITED, [Need("a", 2), Need("b", 4)], pending_after=3, menu=MENU)
    assert [(g.tokens, g.nanos) for g in grants] == [(None, None), (None, None)]
    assert all(g.max_output_tokens > 0 for g in grants)
    assert policy.synthesis_reserve(UNLIMITED) == UNLIMITED


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_synthesis_reserve_is_the_manager_share(policy: Policy) -> None:
    assert policy.synthesis_reserve(Pool(10_000, 2_000_000)) == Pool(1_500, 300_000)
    assert policy.synthesis_reserve(Pool(None, 999)) == Pool(None, 149)


def test_uniform_splits_equally_counting_later_waves() -> None:
    grants = Uniform().split(
        Pool(9_000, 90), [Need("a", 1), Need("b", 5)], pending_after=1, menu=MENU
    )
    assert [(g.tokens, g.nanos) for g in grants] == [(3_000, 30), (3_000, 30)]
    assert [g.endpoint for g in grants] == [None, None]
    assert [g.max_output_tokens for g in grants] == [1_024, 1_024]
    small = Uniform().split(
        Pool(1_000, None), [Need("a", 1, prompt_tokens=300)], pending_after=1, menu=MENU
    )
    assert (small[0].tokens, small[0].max_output_tokens) == (500, 200)  # capped by the share


# -- tiers follow difficulty ------------------------------------------------------


def test_tiered_output_tokens_follow_the_ladder() -> None:
    wave = [Need(f"d{d}", d) for d in (1, 2, 3, 4, 5)]
    grants = Tiered().split(UNLIMITED, wave, pending_after=0, menu=MENU)
    assert [g.max_output_tokens for g in grants] == [TIERS[d] for d in (1, 2, 3, 4, 5)]
    assert [g.max_output_tokens for g in grants] == [512, 512, 1024, 2048, 2560]
    out_of_range = Tiered().split(
        UNLIMITED, [Need("lo", 0), Need("hi", 9)], pending_after=0, menu=MENU
    )
    assert [g.max_output_tokens for g in out_of_range] == [TIERS[1], TIERS[5]]


def test_tiered_gives_a_harder_subtask_a_bigger_share() -> None:
    wave = [Need("easy", 1, prompt_tokens=0), Need("hard", 5, prompt_tokens=0)]
    easy, hard = Tiered().split(Pool(30_720, 3_072_000), wave, pending_after=0, menu=MENU)
    assert (easy.tokens, hard.tokens) == (5_120, 25_600)  # 512 : 2560
    assert (easy.nanos, hard.nanos) == (512_000, 2_560_000)
    # two later subtasks count 1024 each, so this wave takes 3072 of 5120 parts
    easy, hard = Tiered().split(Pool(51_200, None), wave, pending_after=2, menu=MENU)
    assert (easy.tokens, hard.tokens) == (5_120, 25_600)


def test_local_first_and_adaptive_weight_shares_by_difficulty() -> None:
    wave = [Need("easy", 1, prompt_tokens=0), Need("hard", 5, prompt_tokens=0)]
    lf = LocalFirst().split(Pool(30_720, None), wave, pending_after=0, menu=MENU)
    assert [g.tokens for g in lf] == [5_120, 25_600]
    assert [g.endpoint for g in lf] == ["local", "local"]
    ad = Adaptive().split(Pool(60_000, None), wave, pending_after=0, menu=MENU)
    assert [g.tokens for g in ad] == [10_000, 50_000]  # weights 1 : 5


def test_a_small_share_caps_the_output_tokens() -> None:
    [grant] = Tiered().split(
        Pool(1_500, None), [Need("a", 5, prompt_tokens=1_000)], pending_after=0, menu=MENU
    )
    assert (grant.tokens, grant.max_output_tokens) == (1_500, 500)
    [grant] = Tiered().split(
        Pool(800, None), [Need("a", 5, prompt_tokens=1_000)], pending_after=0, menu=MENU
    )
    assert (grant.tokens, grant.max_output_tokens) == (800, 0)


# -- escalation only when the pool can pay ----------------------------------------


def test_uniform_never_escalates() -> None:
    failures = [
        tried("a", 5, "local", cut=True),
        tried("b", 3, "local", signals=["empty"]),
        tried("c", 1, "mid", signals=["rejected"]),
    ]
    assert Uniform().escalate(UNLIMITED, failures, menu=MENU) == []


def test_tiered_climbs_one_tier_when_the_pool_covers_the_call() -> None:
    cut = tried("a", 3, "strong", asked=1_024, cut=True, prompt=100)
    price = STRONG.cost(input_tokens=100, output_tokens=2_048)
    [grant] = Tiered().escalate(Pool(100 + 2_048, price), [cut], menu=MENU)
    assert grant == Grant("a", 2_148, price, 2_048, "strong")
    assert Tiered().escalate(Pool(100 + 2_048, price - 1), [cut], menu=MENU) == []
    assert Tiered().escalate(Pool(100 + 2_047, price), [cut], menu=MENU) == []
    top = tried("a", 5, "strong", asked=2_560, cut=True, prompt=0)
    [grant] = Tiered().escalate(UNLIMITED, [top], menu=MENU)
    assert grant.max_output_tokens == 5_120  # past the ladder: double


def test_tiered_escalates_only_cut_replies_within_max_attempts() -> None:
    assert Tiered().escalate(UNLIMITED, [tried("a", 3, "mid", signals=["empty"])], menu=MENU) == []
    second = tried("a", 3, "mid", cut=True, attempt=2)
    assert Tiered().escalate(UNLIMITED, [second], menu=MENU) == []
    assert [
        g.subtask_id for g in Tiered(max_attempts=3).escalate(UNLIMITED, [second], menu=MENU)
    ] == ["a"]


def test_tiered_hardest_first_when_only_one_fits() -> None:
    easy = tried("easy", 1, "mid", asked=512, cut=True, prompt=0)
    hard = tried("hard", 5, "mid", asked=512, cut=True, prompt=0)
    one = MID.cost(input_tokens=0, output_tokens=1_024)
    grants = Tiered().escalate(Pool(None, one), [easy, hard], menu=MENU)
    assert [g.subtask_id for g in grants] == ["hard"]
    grants = Tiered().escalate(Pool(None, 2 * one), [easy, hard], menu=MENU)
    assert [g.subtask_id for g in grants] == ["hard", "easy"]


def test_local_first_escalates_only_on_failure_one_step_up() -> None:
    fine = tried("ok", 2, "local")
    empty = tried("e", 2, "local", signals=["empty"])
    rejected = tried("r", 2, "mid", signals=["rejected"])
    grants = LocalFirst().escalate(RICH, [fine, empty, rejected], menu=MENU)
    assert sorted((g.subtask_id, g.endpoint) for g in grants) == [("e", "mid"), ("r", "strong")]
    top = tried("t", 2, "strong", signals=["empty"])
    assert LocalFirst().escalate(RICH, [top], menu=MENU) == []  # nowhere higher


def test_local_first_climbs_to_a_local_option_before_a_remote_one() -> None:
    pricey_local = Option("big-local", "local", 3, Price.of("5", "5"))
    menu = Menu((STRONG, MID, pricey_local, LOCAL), Stats(), default="local")
    [grant] = LocalFirst().escalate(RICH, [tried("a", 2, "local", signals=["empty"])], menu=menu)
    assert grant.endpoint == "big-local"
    # from big-local (tier 3) mid (tier 2) is no step up: strong is
    [grant] = LocalFirst().escalate(
        RICH, [tried("a", 2, "big-local", signals=["empty"])], menu=menu
    )
    assert grant.endpoint == "strong"


def test_local_first_skips_a_pricier_but_weaker_option() -> None:
    pricey_weak = Option("weak", "remote", 1, Price.of("0.5", "2"))
    menu = Menu((STRONG, MID, pricey_weak, LOCAL), Stats(), default="local")
    [grant] = LocalFirst().escalate(RICH, [tried("a", 2, "mid", signals=["empty"])], menu=menu)
    assert grant.endpoint == "strong"


def test_local_first_pays_only_what_the_pool_covers() -> None:
    out = tried("a", 3, "local", signals=["empty"], prompt=100)
    price = MID.cost(input_tokens=100, output_tokens=TIERS[3])
    [grant] = LocalFirst().escalate(Pool(100 + TIERS[3], price), [out], menu=MENU)
    assert grant == Grant("a", 100 + TIERS[3], price, TIERS[3], "mid")
    assert LocalFirst().escalate(Pool(None, price - 1), [out], menu=MENU) == []
    assert LocalFirst().escalate(Pool(100 + TIERS[3] - 1, None), [out], menu=MENU) == []
    # it does not jump past the step it cannot pay for
    assert LocalFirst().escalate(Pool(None, price - 1), [out], menu=MENU) == []


def test_local_first_cut_reply_gets_a_higher_tier_and_attempts_are_capped() -> None:
    cut = tried("a", 1, "local", asked=1_024, cut=True)
    [grant] = LocalFirst().escalate(RICH, [cut], menu=MENU)
    assert (grant.endpoint, grant.max_output_tokens) == ("mid", 2_048)
    third = tried("a", 1, "mid", signals=["empty"], attempt=3)
    assert LocalFirst().escalate(RICH, [third], menu=MENU) == []
    second = tried("a", 1, "mid", signals=["empty"], attempt=2)
    assert [g.endpoint for g in LocalFirst().escalate(RICH, [second], menu=MENU)] == ["strong"]


def test_local_first_custom_failure_signals() -> None:
    flagged = tried("a", 2, "local", signals=["no-final"])
    assert LocalFirst().escalate(RICH, [flagged], menu=MENU) == []
    custom = LocalFirst(failure_signals=frozenset({"no-final"}))
    assert [g.endpoint for g in custom.escalate(RICH, [flagged], menu=MENU)] == ["mid"]


def test_adaptive_escalates_only_when_the_pool_covers_the_call() -> None:
    out = tried("a", 2, "local", prompt=100)
    # no history: strong (tier 4) beats local (tier 1) by far more than min_gain; cold, it
    # is sized from the reply it improves on (twice its 100 tokens, at least the 256 floor),
    # not the 512 ladder
    price = STRONG.cost(input_tokens=100, output_tokens=256)
    [grant] = OPEN.escalate(Pool(100 + 256, price), [out], menu=PAIR)
    assert grant == Grant("a", 100 + 256, price, 256, "strong")
    assert OPEN.escalate(Pool(None, price - 1), [out], menu=PAIR) == []
    assert OPEN.escalate(Pool(100 + 256 - 1, None), [out], menu=PAIR) == []
    long = tried("a", 2, "local", prompt=100, used=400)
    [grant] = OPEN.escalate(RICH, [long], menu=PAIR)
    assert grant.max_output_tokens == 800  # room for twice the reply it improves on
    assert OPEN.escalate(Pool(0, 0), [out], menu=PAIR) == []


def test_adaptive_honours_max_attempts_and_unknown_endpoints() -> None:
    assert OPEN.escalate(RICH, [tried("a", 2, "local", attempt=3)], menu=PAIR) == []
    assert len(OPEN.escalate(RICH, [tried("a", 2, "local", attempt=2)], menu=PAIR)) == 1
    assert OPEN.escalate(RICH, [tried("a", 2, "nowhere")], menu=PAIR) == []
    # the strongest endpoint is asked again only for a reply cut short (no answer to keep),
    # at least one tier higher
    assert OPEN.escalate(RICH, [tried("a", 2, "strong")], menu=PAIR) == []
    cut = tried("a", 2, "strong", asked=512, cut=True)
    [again] = OPEN.escalate(RICH, [cut], menu=Menu((STRONG,), Stats(), "strong"))
    assert (again.endpoint, again.max_output_tokens) == ("strong", 1_024)
    # with a free endpoint beside it, a cut reply's best gain per dollar is the free one
    [down] = OPEN.escalate(RICH, [cut], menu=PAIR)
    assert down.endpoint == "local"
    stats = history(
        (seen("strong", 2, used=100), 20, 20),
        (seen("strong", 2, "cut_short", asked=128, used=128, cut=True), 10, 1),
    )
    learned = Menu((STRONG,), stats, "strong")
    assert Adaptive().tier("strong", 2, stats) == 267  # 128 * 1.25 * (1 + 2 * 10 / 30)
    [again] = OPEN.escalate(RICH, [cut], menu=learned)
    assert (again.endpoint, again.max_output_tokens) == ("strong", 1_024)  # a tier above 512
    uncut = tried("a", 2, "strong", asked=512)
    assert OPEN.escalate(RICH, [uncut], menu=learned) == []


def test_adaptive_prefers_the_best_gain_per_nano_dollar() -> None:
    # no history: mid gains 0.08 for ~0.03 mUSD, strong 0.24 for ~0.5 mUSD
    [grant] = OPEN.escalate(RICH, [tried("a", 2, "local")], menu=MENU)
    assert grant.endpoint == "mid"
    # a gain below min_gain does not count, however cheap
    [grant] = replace(OPEN, min_gain=0.1).escalate(RICH, [tried("a", 2, "local")], menu=MENU)
    assert grant.endpoint == "strong"
    assert replace(OPEN, min_gain=0.25).escalate(RICH, [tried("a", 2, "local")], menu=MENU) == []


def test_adaptive_counts_the_prompt_in_the_price_of_an_escalation() -> None:
    # the same gain: the subtask with the long prompt costs more to escalate, so it waits
    short = tried("short", 2, "local", prompt=50)
    long = tried("long", 2, "local", prompt=20_000)
    ranked = OPEN.escalate(RICH, [long, short], menu=PAIR)
    assert [g.subtask_id for g in ranked] == ["short", "long"]
    one = ranked[0].nanos
    assert one is not None
    [only] = OPEN.escalate(Pool(None, one), [long, short], menu=PAIR)
    assert only.subtask_id == "short"


# -- leftovers go where the policy says -------------------------------------------

CALC_HISTORY = taught(
    (seen("local", 2, signals=["clean"]), 20, 18),
    (seen("local", 2, signals=["calc-bad"]), 20, 2),
    (seen("strong", 2, nanos=500), 20, 19),
)


def test_adaptive_hands_returned_money_to_the_worst_signals_first() -> None:
    menu = Menu(PAIR.options, CALC_HISTORY, "local")
    clean = tried("x", 2, "local", signals=["clean"])
    worst = tried("y", 2, "local", signals=["calc-bad"])
    [alone] = OPEN.escalate(RICH, [worst], menu=menu)
    one = alone.nanos
    assert one is not None
    assert OPEN.escalate(Pool(None, one - 1), [clean, worst], menu=menu) == []
    small = OPEN.escalate(Pool(None, 2 * one - 1), [clean, worst], menu=menu)
    assert [(g.subtask_id, g.endpoint) for g in small] == [("y", "strong")]
    # more money came back: both, in order of gain per nano-dollar
    big = OPEN.escalate(Pool(None, 2 * one), [clean, worst], menu=menu)
    assert [g.subtask_id for g in big] == ["y", "x"]
    assert totals(big)[1] == 2 * one


# -- adaptive learns -----------------------------------------------------------------


def test_adaptive_probes_the_cheap_endpoint_without_history() -> None:
    need = Need("a", 3, prompt_tokens=100)
    [grant] = Adaptive().split(RICH, [need], pending_after=0, menu=MENU)
    assert grant.endpoint == "local"


def test_adaptive_leaves_an_endpoint_that_history_says_fails() -> None:
    need = Need("a", 3, prompt_tokens=100)
    failing = history((seen("local", 3), 20, 1))
    assert Adaptive().chance(LOCAL, 3, (), failing) < Adaptive().probe_floor
    learned = Menu(MENU.options, failing, "local")
    [grant] = Adaptive().split(RICH, [need], pending_after=0, menu=learned)
    assert grant.endpoint == "strong"
    # the stronger endpoint must also be affordable from the share
    [grant] = Adaptive().split(Pool(None, 1_000_000), [need], pending_after=0, menu=learned)
    assert grant.endpoint == "mid"
    # and history that the cheap endpoint works keeps it
    working = Menu(MENU.options, history((seen("local", 3), 20, 19)), "local")
    [grant] = Adaptive().split(RICH, [need], pending_after=0, menu=working)
    assert grant.endpoint == "local"


def test_adaptive_chance_starts_at_the_tier_prior_and_moves_with_history() -> None:
    empty = Stats()
    assert Adaptive().chance(LOCAL, 3, (), empty) == pytest.approx(0.5)
    assert Adaptive().chance(STRONG, 3, (), empty) == pytest.approx(0.74)
    top = Option("top", "remote", 9, Price.of(1, 1))
    assert Adaptive().chance(top, 3, (), empty) == pytest.approx(0.9)
    good = history((seen("local", 3), 40, 40))
    assert Adaptive().chance(LOCAL, 3, (), good) > 0.9


def test_adaptive_tier_shrinks_to_what_history_used() -> None:
    short = history((seen("strong", 4, asked=2_048, used=90), 30, 30))
    expected = math.ceil(bucket_bound(bucket_of(90)) * 1.25)
    assert expected == 113
    assert Adaptive().tier("strong", 4, Stats()) == TIERS[4]
    assert Adaptive().tier("strong", 4, short) == expected
    [grant] = Adaptive().split(RICH, [Need("a", 4)], pending_after=0, menu=Menu((STRONG,), short))
    assert (grant.endpoint, grant.max_output_tokens) == ("strong", expected)
    # other difficulties learn from the all-difficulty cell
    assert Adaptive().tier("strong", 2, short) == expected
    # cold start: an endpoint without history is sized from what the others used, twice
    # (here 2 x 90, so the 256 floor)
    assert Adaptive().tier("mid", 4, short) == 256
    # or from the reply it is asked to improve on
    assert Adaptive().tier("mid", 4, short, hint=300) == 600


def test_adaptive_tier_needs_min_calls() -> None:
    few = history((seen("strong", 4, used=90), 7, 7))
    assert Adaptive().tier("strong", 4, few) == TIERS[4]
    enough = history((seen("strong", 4, used=90), 8, 8))
    assert Adaptive().tier("strong", 4, enough) == 113


def test_adaptive_tier_grows_when_replies_were_cut_short() -> None:
    whole = history((seen("strong", 3, asked=100, used=100), 30, 30))
    half = history(
        (seen("strong", 3, asked=100, used=100), 15, 15),
        (seen("strong", 3, asked=100, used=100, cut=True), 15, 0),
    )
    cut = history((seen("strong", 3, asked=100, used=100, cut=True), 30, 0))
    base = Adaptive().tier("strong", 3, whole)
    assert base == 160  # 128 * 1.25
    assert Adaptive().tier("strong", 3, half) == 2 * base
    assert Adaptive().tier("strong", 3, cut) == 3 * base


def test_adaptive_tier_is_clamped() -> None:
    tiny = history((seen("strong", 3, asked=10, used=5), 30, 30))
    huge = history((seen("strong", 3, asked=50_000, used=50_000), 30, 30))
    assert Adaptive().tier("strong", 3, tiny) == Adaptive().min_output
    assert Adaptive().tier("strong", 3, huge) == Adaptive().max_output


def test_a_signal_history_ties_to_failure_raises_escalation() -> None:
    stats = taught(
        (seen("local", 2, signals=["clean"]), 40, 38),
        (seen("local", 2, signals=["calc-bad"]), 10, 1),
        (seen("strong", 2), 50, 40),
    )
    menu = Menu(PAIR.options, stats, "local")
    policy = replace(OPEN, min_gain=0.05)
    clean = tried("a", 2, "local", signals=["clean"])
    flagged = tried("a", 2, "local", signals=["calc-bad"])
    assert policy.chance(LOCAL, 2, (), stats, signals=["calc-bad"]) < policy.chance(
        LOCAL, 2, (), stats, signals=["clean"]
    )
    assert policy.escalate(RICH, [clean], menu=menu) == []
    assert [g.endpoint for g in policy.escalate(RICH, [flagged], menu=menu)] == ["strong"]
    # a signal history never saw carries no evidence of its own: the base rate decides
    unseen = tried("a", 2, "local", signals=["clean", "never-seen"])
    assert policy.escalate(RICH, [unseen], menu=menu) == []


# -- choosing a policy ------------------------------------------------------------


def test_make_policy_by_name() -> None:
    assert policy_names() == ["adaptive", "local-first", "tiered", "uniform"]
    kinds = {"adaptive": Adaptive, "local-first": LocalFirst, "tiered": Tiered, "uniform": Uniform}
    for name, kind in kinds.items():
        policy = make_policy(name)
        assert isinstance(policy, kind)
        assert policy.name == name


def test_make_policy_unknown_name_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown allocation policy 'greedy'") as err:
        make_policy("greedy")
    for name in policy_names():
        assert name in str(err.value)
    with pytest.raises(ValueError, match="Tiered"):
        make_policy("Tiered")


# -- statistics values --------------------------------------------------------------


def test_cell_quantile() -> None:
    cell = Cell(calls=10, hist=(2, 0, 5, 3))
    assert cell.quantile(0.2) == bucket_bound(0) == 16
    assert cell.quantile(0.21) == bucket_bound(2) == 32
    assert cell.quantile(0.7) == 32
    assert cell.quantile(0.71) == bucket_bound(3) == 45
    assert cell.quantile(1.0) == 45
    assert Cell().quantile(0.9) is None
    assert Cell(hist=(0, 0, 0)).quantile(0.5) is None


def test_cell_rates() -> None:
    cell = Cell(calls=4, asked=1_000, used=250, cut=1, ok=3, bad=1, nanos=10)
    assert cell.judged == 4
    assert cell.success(0.5, 4) == pytest.approx((3 + 2) / 8)
    assert cell.cut_rate == 0.25
    assert cell.mean_nanos == 2.5
    assert cell.idle_ratio == 0.75
    assert Cell().mean_nanos is None
    assert (Cell().cut_rate, Cell().idle_ratio) == (0.0, 0.0)
    assert Cell().success(0.3) == pytest.approx(0.3)


def test_buckets_by_hand() -> None:
    assert [bucket_of(t) for t in (0, 1, 16, 17, 22, 23, 32, 33, 45, 46)] == [
        0, 0, 0, 1, 1, 2, 2, 3, 3, 4,
    ]  # fmt: skip
    assert [bucket_bound(i) for i in range(5)] == [16, 22, 32, 45, 64]
    assert bucket_of(10**9) == 31  # the last bucket takes everything above


@given(st.integers(0, bucket_bound(31)))
def test_every_count_fits_the_smallest_bucket_that_holds_it(tokens: int) -> None:
    index = bucket_of(tokens)
    assert 0 <= index < 32
    assert tokens <= bucket_bound(index)
    if index > 0:
        assert tokens > bucket_bound(index - 1)


def test_bucket_bounds_grow() -> None:
    bounds = [bucket_bound(i) for i in range(32)]
    assert bounds == sorted(set(bounds))
    assert all(bucket_of(b) == i for i, b in enumerate(bounds))


def test_clean_tag() -> None:
    assert clean_tag("  Math Word  ") == "math-word"
    assert clean_tag("a/b|c") == "a-b-c"
    assert clean_tag("keep_these.:-ok") == "keep_these.:-ok"
    assert clean_tag("--x--") == "x"
    assert clean_tag("***") == "-"
    assert clean_tag("") == "-"
    assert clean_tag("x" * 100) == "x" * 64
    assert clean_tag("a" * 63 + " b") == "a" * 63  # a cut ending on a dash loses it too


@given(st.text(max_size=200) | st.text(alphabet="aZ9 -/.|İ\u212a", min_size=60, max_size=70))
@example("a" * 63 + "/b")
def test_clean_tag_is_idempotent(tag: str) -> None:
    once = clean_tag(tag)
    assert clean_tag(once) == once
    assert 1 <= len(once) <= 64


@given(st.text(max_size=120))
def test_clean_tag_always_gives_a_key(tag: str) -> None:
    assert re.fullmatch(r"[a-z0-9_.:\-]{1,64}", clean_tag(tag))
    assert "|" not in clean_tag(tag)


def test_cell_prefixes() -> None:
    assert cell_prefixes("cheap", 3, ["b", "A", "a"]) == [
        "cheap|3|*|", "cheap|3|a|", "cheap|3|b|", "cheap|0|*|", "cheap|0|a|", "cheap|0|b|",
    ]  # fmt: skip
    assert cell_prefixes("e.v-1:x", 5, []) == ["e.v-1:x|5|*|", "e.v-1:x|0|*|"]


@pytest.mark.parametrize("endpoint", ["no|pipes", "", "has space", "-dash-first", "x" * 129])
def test_cell_prefixes_rejects_bad_endpoint_names(endpoint: str) -> None:
    with pytest.raises(InvalidName, match="endpoint"):
        cell_prefixes(endpoint, 3, [])


@pytest.mark.parametrize("difficulty", [ANY_DIFFICULTY, -1, 6, 100])
def test_cell_prefixes_rejects_difficulty_out_of_range(difficulty: int) -> None:
    with pytest.raises(ValueError, match="difficulty must be 1-5"):
        cell_prefixes("cheap", difficulty, [])


def test_observation_fields() -> None:
    plain = Observation("cheap", 2, ("math",), asked=512, used=300, cut_short=False, nanos=0)
    fields = dict(plain.fields())
    assert len(fields) == len(plain.fields())
    assert fields == {
        **{f"cheap|{d}|{t}|{m}": v for d in (2, 0) for t in ("*", "math")
           for m, v in (("n", 1), ("a", 512), ("u", 300))},
        "cheap|2|*|h" + str(bucket_of(300)): 1,
        "cheap|0|*|h" + str(bucket_of(300)): 1,
    }  # fmt: skip
    marked = Observation("cheap", 2, (), asked=1, used=1, cut_short=True, nanos=7, escalated=True)
    got = dict(marked.fields())
    assert (got["cheap|2|*|c"], got["cheap|0|*|e"], got["cheap|0|*|nanos"]) == (1, 1, 7)


def test_stats_from_fields() -> None:
    raw = {
        b"cheap|3|*|n": b"4",
        b"cheap|3|*|ok": b"3",
        b"cheap|3|*|bad": b"1",
        b"cheap|3|*|h0": b"1",
        b"cheap|3|*|h2": b"3",
        b"cheap|3|*|h5": b"0",
        "cheap|0|math|nanos": "12",
        b"junk": b"1",
        b"cheap|x|*|n": b"9",
        b"too|many|parts|here|n": b"9",
    }
    stats = Stats.from_fields(raw)
    assert set(stats.cells) == {("cheap", 3, ANY_TAG), ("cheap", 0, "math")}
    cell = stats.cell("cheap", 3)
    assert (cell.calls, cell.ok, cell.bad, cell.hist) == (4, 3, 1, (1, 0, 3))
    assert stats.cell("cheap", ANY_DIFFICULTY, "math").nanos == 12
    assert stats.cell("nowhere") == Cell()


def test_stats_of_summed_observations_count_each_cell() -> None:
    stats = history(
        (seen("cheap", 2, "math", asked=512, used=300, nanos=5), 3, 2),
        (seen("cheap", 4, asked=1_024, used=1_024, cut=True, nanos=9), 2, 0),
    )
    every = stats.cell("cheap", ANY_DIFFICULTY)
    assert (every.calls, every.asked, every.used, every.cut, every.nanos) == (
        5, 3 * 512 + 2 * 1_024, 3 * 300 + 2 * 1_024, 2, 3 * 5 + 2 * 9,
    )  # fmt: skip
    assert (every.ok, every.bad) == (2, 3)
    assert sum(every.hist) == 5
    assert stats.cell("cheap", 2, "math").calls == 3
    assert stats.cell("cheap", 4, "math").calls == 0
    assert every.quantile(0.5) == bucket_bound(bucket_of(300))
    assert every.quantile(1.0) == bucket_bound(bucket_of(1_024))


# -- targets, cold start, exploration ------------------------------------------------------


def test_targets_parse_and_refuse_what_they_cannot_mean() -> None:
    assert Target.parse("0.35") == Target(cost_ratio=0.35)
    assert Target.parse("ratio:0.2") == Target(cost_ratio=0.2)
    assert Target.parse(" usd_per_point:0.0005 ") == Target(
        cost_ratio=None, usd_per_point=Decimal("0.0005")
    )
    for bad in ("ratio:0", "ratio:-1", "ratio:11", "usd_per_point:-0.1", "cheap", "speed:1", "nan"):
        with pytest.raises(ValueError, match=r"target|ratio|point"):
            Target.parse(bad)
    with pytest.raises(ValueError, match="exactly one"):
        Target(cost_ratio=0.3, usd_per_point=Decimal(1))
    chosen = make_policy("adaptive", target=Target(cost_ratio=0.2), explore=0.0)
    assert isinstance(chosen, Adaptive)
    assert (chosen.target, chosen.explore) == (Target(cost_ratio=0.2), 0.0)
    assert make_policy("tiered", target=Target(cost_ratio=0.2)) == Tiered()
    with pytest.raises(ValueError, match="exploration share"):
        make_policy("adaptive", explore=1.5)


def test_a_cost_ratio_escalates_the_best_gain_per_dollar_until_the_ratio_is_spent() -> None:
    # ten cheap tries, one of them flagged: at a ratio of one strong call in ten, only
    # the flagged one is escalated; at half, five
    stats = taught(
        (seen("local", 2, signals=["clean"]), 30, 27),
        (seen("local", 2, signals=["calc-bad"]), 30, 3),
        (seen("strong", 2, used=100), 30, 27),
    )
    menu = Menu(PAIR.options, stats, "local")
    outs = [
        tried(f"s{i}", 2, "local", signals=["calc-bad" if i == 3 else "clean"]) for i in range(10)
    ]
    one = Adaptive(target=Target(cost_ratio=0.12), explore=0.0)
    assert [g.subtask_id for g in one.escalate(RICH, outs, menu=menu)] == ["s3"]
    # until they ran, escalations are charged their hold (here 200 tokens, the expected 100
    # twice): 0.95 of ten expected calls hold five, and the policy's dice may add a sixth
    most = Adaptive(target=Target(cost_ratio=0.95), explore=0.0)
    grants = most.escalate(RICH, outs, menu=menu)
    assert grants[0].subtask_id == "s3"
    assert {g.nanos for g in grants} == {STRONG.cost(input_tokens=100, output_tokens=200)}
    assert 5 <= len(grants) <= 6
    # a price per point: pays only where the gain is worth it
    # a strong call's price per 50 points: worth paying for a gain of 0.5 or more
    worth = STRONG.cost(input_tokens=100, output_tokens=100) / 1e9 / 50
    strict = Adaptive(target=Target(cost_ratio=None, usd_per_point=Decimal(str(worth))))
    picked = [g.subtask_id for g in replace(strict, explore=0.0).escalate(RICH, outs, menu=menu)]
    assert picked == ["s3"]  # its gain is ~0.58; the others' ~0.2


def test_a_task_of_one_subtask_still_spends_its_ratio_on_average() -> None:
    policy = Adaptive(target=Target(cost_ratio=0.3), explore=0.0)
    granted = sum(
        bool(policy.escalate(RICH, [tried(f"t{i}", 2, "local")], menu=PAIR)) for i in range(400)
    )
    assert 0.15 < granted / 400 < 0.35  # ~0.3 of one strong call each: the policy's dice


def test_cold_start_escalates_the_most_valuable_at_a_low_budget() -> None:
    # No history: every cheap try has the same chance, so the value of an escalation is its
    # price. The pool cannot pay one strong call at the 512 ladder, but it pays one sized
    # from the reply it improves on (256 tokens): the cheapest to improve goes, not none.
    outs = [
        tried("long-prompt", 2, "local", used=120, prompt=3_000),
        tried("short", 2, "local", used=120, prompt=100),
        tried("long-reply", 2, "local", used=400, prompt=100),
    ]
    ladder = STRONG.cost(input_tokens=100, output_tokens=TIERS[2])
    small = Pool(None, ladder - 1)
    grants = Adaptive().escalate(small, outs, menu=PAIR)
    assert [(g.subtask_id, g.max_output_tokens) for g in grants] == [("short", 256)]
    # with more money, the next most valuable: the long reply (its prompt is short)
    more = OPEN.escalate(Pool(None, 3 * ladder), outs, menu=PAIR)
    assert [g.subtask_id for g in more][:2] == ["short", "long-reply"]
    # ...and a split without history still probes the cheap endpoint
    [first] = Adaptive().split(Pool(None, 10**7), [Need("a", 2)], pending_after=0, menu=PAIR)
    assert first.endpoint == "local"


def test_the_learner_changes_the_choice_when_an_endpoint_fails_or_wastes_tokens() -> None:
    need = Need("a", 3, ("q:percent",), prompt_tokens=100)
    twin = Option("twin", "remote", 2, MID.price)
    menu = Menu((MID, twin), Stats(), "mid")
    [grant] = Adaptive().split(RICH, [need], pending_after=0, menu=menu)
    assert grant.endpoint == "mid"  # equal: the first cheapest
    # mid wastes tokens: ten times twin's output for the same work
    wasteful = taught(
        (seen("mid", 3, "q:percent", used=2_000, asked=2_048), 20, 18),
        (seen("twin", 3, "q:percent", used=200), 20, 18),
    )
    [grant] = Adaptive().split(RICH, [need], pending_after=0, menu=Menu(menu.options, wasteful))
    assert grant.endpoint == "twin"
    # the local endpoint fails on percentages (the learner, not only the base rate)
    failing = taught(
        (seen("local", 3, "q:percent"), 80, 4),
        (seen("local", 3, "q:plain"), 80, 76),
    )
    learned = Menu(MENU.options, failing, "local")
    [grant] = Adaptive().split(RICH, [need], pending_after=0, menu=learned)
    assert grant.endpoint != "local"
    plain = Need("b", 3, ("q:plain",), prompt_tokens=100)
    [grant] = Adaptive().split(RICH, [plain], pending_after=0, menu=learned)
    assert grant.endpoint == "local"


def test_exploration_keeps_a_share_of_cheap_tries_and_escalations() -> None:
    failing = taught((seen("local", 3), 40, 1))
    menu = Menu(PAIR.options, failing, "local")
    needs = [Need(f"n{i}", 3, prompt_tokens=100) for i in range(400)]
    policy = Adaptive(explore=0.1)
    firsts = [policy.split(RICH, [n], pending_after=0, menu=menu)[0].endpoint for n in needs]
    assert 0.05 < firsts.count("local") / 400 < 0.15  # history says local fails: ~10% still
    assert Adaptive(explore=0.0).split(RICH, needs[:50], pending_after=0, menu=menu)[
        0
    ].endpoint == ("strong")
    # a strong answer history says is right is escalated to the cheap endpoint ~10% of the time
    good = taught((seen("strong", 3), 40, 39), (seen("local", 3), 40, 1))
    menu = Menu(PAIR.options, good, "local")
    tries = [tried(n.subtask_id, 3, "strong") for n in needs]
    opened = replace(policy, target=Target(cost_ratio=10))
    explored = [g.endpoint for g in opened.escalate(RICH, tries, menu=menu)]
    assert set(explored) <= {"local"}
    assert 0.05 < len(explored) / 400 < 0.15
    assert replace(opened, explore=0.0).escalate(RICH, tries, menu=menu) == []


def test_exploration_grants_say_so_and_their_pairs_price_the_reference() -> None:
    good = taught((seen("strong", 3), 40, 39), (seen("local", 3), 40, 1))
    menu = Menu(PAIR.options, good, "local")
    tries = [tried(f"n{i}", 3, "strong") for i in range(400)]
    opened = Adaptive(explore=0.1, target=Target(cost_ratio=10))
    grants = opened.escalate(RICH, tries, menu=menu)
    assert grants
    assert all(g.explore for g in grants)
    plain = OPEN.escalate(RICH, [tried("a", 2, "local")], menu=PAIR)
    assert [g.explore for g in plain] == [False]
    # the reference's cost of a subtask it never answered: from explored pairs once there
    # are enough (the strong endpoint answers 3x as long as the cheap one did), before that
    # from every escalated pair (here 1x)
    outs = [tried("x", 2, "local", used=100)]
    biased = history((seen("strong", 2, used=100), 20, 20))
    rows = [
        (replace(seen("strong", 2, used=3 * b), before_used=b, explored=True), 1, 1)
        for b in range(50, 210, 20)
    ]
    unbiased = history((seen("strong", 2, used=100), 20, 20), *rows)
    policy = Adaptive(target=Target(cost_ratio=1.0), explore=0.0)
    low = policy.allowance(outs, Menu(PAIR.options, biased, "local"))
    high = policy.allowance(outs, Menu(PAIR.options, unbiased, "local"))
    assert low == STRONG.cost(input_tokens=100, output_tokens=100)
    assert high == STRONG.cost(input_tokens=100, output_tokens=300)
