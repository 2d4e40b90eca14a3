"""An online logistic model of whether an endpoint's try is right, from correlated evidence.

Cells (:mod:`budgets.stats`) count each tag on its own; a question's tags and a
reply's signals overlap (a reply with a wrong step often also lacks a final
answer), and multiplying their rates as if they were independent counts the
same evidence twice. This model weighs them together instead: per endpoint,
two logistic regressions over sparse features,

* head ``q`` — before any reply: ``bias``, the difficulty (``d:<n>``), each tag
  (``t:<tag>``) and the prompt's size (``ptok``, log2 of the prompt tokens / 10);
* head ``r`` — after this endpoint's own reply: the same, plus each of the
  reply's signals (``s:<signal>``).

The weights live in Redis beside the scope's cells (:attr:`~budgets.keys.StatsKeys.model`):
``w|<endpoint>|<head>|<feature>`` the weight, ``g|…`` the sum of squared
gradients (AdaGrad's per-feature step), ``n|<endpoint>|<head>`` how many
verdicts it learned from. A try's features are stored with its outcome when it
is recorded; its verdict takes one AdaGrad step on them, inside the verdict's
script, so a verdict moves counts and weights together and once. A changed
verdict takes one more step toward the new label (the earlier step is not
undone exactly; it fades at the learning rate's pace).

:class:`Weights` is the pure snapshot a policy reads (it arrives inside the
:class:`~budgets.stats.Stats` of the :class:`~budgets.policy.Menu`);
:func:`learn` is the same step in Python, for tests and offline fitting.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal

from budgets.keys import clean_tag

Head = Literal["q", "r"]
#: Run-time signals the flow lists among a try's tags: the learner counts them as the reply's.
RUNTIME_SIGNALS = frozenset({"cut_short", "empty", "rejected"})
#: Signals of a reply that failed or whose own work does not add up (the verifier's, in
#: ``agents/verifier.py``): before the learner has seen many verdicts, each lowers the
#: chance of the reply being right by a prior amount, so a cold policy escalates them first.
FAULT_SIGNALS = frozenset(
    {
        "cut_short",
        "empty",
        "rejected",
        "no-final",
        "final-not-number",
        "calc-bad",
        "eq-bad",
        "final-not-last",
        "final-unsupported",
        "fraction",
    }
)
#: AdaGrad's base step and the L2 pull toward zero of each step.
LEARNING_RATE = 0.3
L2 = 1e-3


def question_features(difficulty: int, tags: Iterable[str], prompt_tokens: int) -> dict[str, float]:
    """Head ``q``'s features of a subtask: what is known before any reply."""
    feats = {"bias": 1.0, f"d:{int(difficulty)}": 1.0}
    feats["ptok"] = round(math.log2(1 + max(0, prompt_tokens)) / 10, 6)
    for tag in tags:
        feats["t:" + clean_tag(tag)] = 1.0
    return feats


def reply_features(
    difficulty: int, tags: Iterable[str], prompt_tokens: int, signals: Iterable[str]
) -> dict[str, float]:
    """Head ``r``'s features: the subtask's, and the signals of this endpoint's reply."""
    feats = question_features(difficulty, tags, prompt_tokens)
    for signal in signals:
        feats["s:" + clean_tag(signal)] = 1.0
    return feats


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1 / (1 + math.exp(-z))
    e = math.exp(z)
    return e / (1 + e)


@dataclass(frozen=True, slots=True)
class Weights:
    """Every endpoint's weights and update counts as read at one moment; pure."""

    w: Mapping[str, float] = field(default_factory=dict)
    n: Mapping[str, int] = field(default_factory=dict)

    def updates(self, endpoint: str, head: Head) -> int:
        """How many verdicts ``endpoint``'s ``head`` learned from."""
        return self.n.get(f"{endpoint}|{head}", 0)

    def chance(self, endpoint: str, head: Head, feats: Mapping[str, float]) -> float:
        """The model's chance that the try is right (0.5 before it learned anything)."""
        prefix = f"{endpoint}|{head}|"
        z = sum(self.w.get(prefix + name, 0.0) * value for name, value in feats.items())
        return _sigmoid(z)

    @classmethod
    def from_fields(cls, raw: Mapping[Any, Any]) -> Weights:
        """Parse the Redis hash (``w|…`` weights, ``n|…`` counts; ``g|…`` is the learner's)."""
        w: dict[str, float] = {}
        n: dict[str, int] = {}
        for key, value in raw.items():
            text = key.decode() if isinstance(key, bytes) else str(key)
            kind, _, rest = text.partition("|")
            number = value.decode() if isinstance(value, bytes) else str(value)
            if kind == "w":
                w[rest] = float(number)
            elif kind == "n":
                n[rest] = int(number)
        return cls(w, n)


def encode(endpoint: str, heads: Mapping[Head, Mapping[str, float]]) -> str:
    """A try's features as its outcome's marker keeps them: one line per head."""
    lines = []
    for head, feats in heads.items():
        cells = "\t".join(f"{name}={value!r}" for name, value in sorted(feats.items()))
        lines.append(f"{endpoint}|{head}\t{cells}")
    return "\n".join(lines)


def learn(
    fields: MutableMapping[str, float],
    encoded: str,
    *,
    ok: bool,
    learning_rate: float = LEARNING_RATE,
    l2: float = L2,
) -> None:
    """One AdaGrad step of every head in ``encoded`` toward ``ok``, on a dict of hash fields.

    The same arithmetic as the verdict script's, for tests and offline fitting.
    """
    y = 1.0 if ok else 0.0
    for line in encoded.splitlines():
        model, *cells = line.split("\t")
        feats = [(name, float(value)) for name, _, value in (c.partition("=") for c in cells)]
        z = sum(fields.get(f"w|{model}|{name}", 0.0) * x for name, x in feats)
        err = y - _sigmoid(z)
        for name, x in feats:
            w = fields.get(f"w|{model}|{name}", 0.0)
            grad = err * x - l2 * w
            g2 = fields.get(f"g|{model}|{name}", 0.0) + grad * grad
            fields[f"g|{model}|{name}"] = g2
            if g2 > 0:
                fields[f"w|{model}|{name}"] = w + learning_rate * grad / math.sqrt(g2)
        fields[f"n|{model}"] = fields.get(f"n|{model}", 0) + 1


__all__ = [
    "FAULT_SIGNALS",
    "L2",
    "LEARNING_RATE",
    "RUNTIME_SIGNALS",
    "Head",
    "Weights",
    "encode",
    "learn",
    "question_features",
    "reply_features",
]
