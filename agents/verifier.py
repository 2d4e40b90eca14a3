"""What a reply shows about itself, read without knowing the right answer.

:func:`reply_signals` is a pure function of a worker's reply text (and, when
known, the question and the reply's output-token count). Its signals go to the
statistics with the try's outcome and to the policy's escalation decision, so
a cheap reply whose own work does not add up is the first to get a second
opinion. Every signal is a plain tag:

========================  ===================================================
``empty``                 the reply has no text
``no-final``              no final answer: no ``#### n``, ``answer is n``,
                          ``Answer: n``, ``\\boxed{n}`` or ``= n`` ending the
                          reply
``final-not-number``      a final-answer marker is followed by no number
``calc-bad``              a ``<<a*b=c>>`` calculator annotation that does not
                          compute
``eq-bad``                an ``a op b = c`` step in the text that does not
                          compute (the expression is recomputed)
``final-not-last``        the final answer is not the last number the work
                          computed
``final-unsupported``     the final answer appears nowhere in the work before
                          it: it contradicts the reply's own steps
``fraction``              the final answer is not a whole number
``negative``              the final answer is negative
``hedge``                 hedging words (assume, however, cannot, approximately,
                          round, not possible, unclear)
``few-steps``             fewer than two computed steps
``unused-numbers``        two or more numbers of the question never appear in
                          the reply (only with ``question=``)
``len:<0-4>``             the length bucket, hundreds of output tokens (only
                          with ``output_tokens=``)
========================  ===================================================

Arithmetic is recomputed only where it is plain: digits, ``+ - * /``, ``x`` or the multiplication
and division signs,
parentheses, at most 80 characters; nothing is ever executed but that.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable

from budgets.learner import FAULT_SIGNALS, RUNTIME_SIGNALS

_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")
_CALC = re.compile(r"<<([^=<>]+)=([^<>]+)>>")
_EQUATION = re.compile(
    r"(\(?\s*\d[\d,.]*\s*\)?\s*(?:[-+*/x\u00d7\u00f7]\s*\(?\s*\$?[\d,.]+\s*\)?\s*)+)"
    r"=\s*\$?(-?\d[\d,]*\.?\d*)"
)
_FINAL = re.compile(
    r"(?:####|answer is:?|answer:|\\boxed\{)\s*\$?\s*(-?[\d,]*\.?\d+)?", re.IGNORECASE
)
_TAIL_EQUALS = re.compile(r"=\s*\$?\s*(-?\d[\d,]*\.?\d*)[^\d=]{0,40}$")
_ARITH = re.compile(r"^[\d\s.+\-*/()]+$")
_HEDGES = ("assum", "however", "not possible", "cannot", "approximately", "round", "unclear")
_OPS: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}

#: Every signal :func:`reply_signals` can give, but the ``len:<n>`` buckets; those of them
#: that say the reply failed or contradicts itself are the policy's
#: :data:`budgets.learner.FAULT_SIGNALS`.
SIGNALS = (FAULT_SIGNALS - RUNTIME_SIGNALS) | {
    "empty",
    "negative",
    "hedge",
    "few-steps",
    "unused-numbers",
}


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    raise ValueError("not plain arithmetic")


def recompute(expression: str) -> float | None:
    """The value of a plain arithmetic expression, or ``None`` when it is not one."""
    expr = expression.replace(",", "").replace("$", "")
    expr = expr.replace("x", "*").replace("\u00d7", "*").replace("\u00f7", "/").strip()
    if not expr or len(expr) > 80 or not _ARITH.match(expr) or "**" in expr or "//" in expr:
        return None
    try:
        return _evaluate(ast.parse(expr, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return None


def step_checks(expression: str, stated: str) -> bool | None:
    """Whether ``expression`` computes to ``stated``; ``None`` when it cannot be checked."""
    got, target = recompute(expression), _number(stated)
    if got is None or target is None:
        return None
    return abs(got - target) <= 1e-2 * max(1.0, abs(target))


def final_answer(text: str) -> tuple[float | None, int | None, bool]:
    """The reply's final answer, where it starts, and whether a marker announced it.

    ``(None, None, False)`` without one; a marker with no number after it gives
    ``(None, start, True)``. Without a marker, a last ``= n`` near the end of the
    reply is its answer (``marked`` False: the work cannot be checked against it).
    """
    marks = list(_FINAL.finditer(text))
    found = marks[-1] if marks else None  # the last marker is the final one
    if found is not None:
        return (_number(found.group(1)) if found.group(1) else None), found.start(), True
    tail = _TAIL_EQUALS.search(text.rstrip())
    if tail is not None:
        return _number(tail.group(1)), tail.start(), False
    return None, None, False


def reply_signals(
    text: str, *, question: str | None = None, output_tokens: int | None = None
) -> list[str]:
    """The signals of one reply, sorted (see the module's table)."""
    out: set[str] = set()
    if output_tokens is not None:
        out.add(f"len:{min(4, max(0, output_tokens) // 100)}")
    if not text.strip():
        return sorted(out | {"empty", "no-final"})
    final, at, marked = final_answer(text)
    if at is None:
        out.add("no-final")
    elif final is None:
        out.add("final-not-number")
    else:
        if final != round(final):
            out.add("fraction")
        if final < 0:
            out.add("negative")
    if final is not None and at is not None and marked:
        work = text[:at]
        body = _CALC.sub("", work)
        computed = [n for n in (_number(x) for x in _NUMBER.findall(body)) if n is not None]
        if not computed or computed[-1] != final:
            out.add("final-not-last")
        stated = [_number(v) for _, v in _CALC.findall(work)]
        mentioned = computed + [v for v in stated if v is not None]
        if computed and all(abs(n - final) > 1e-9 for n in mentioned):
            out.add("final-unsupported")
    calcs = _CALC.findall(text)
    if any(step_checks(e, v) is False for e, v in calcs):
        out.add("calc-bad")
    equations = _EQUATION.findall(_CALC.sub("", text))
    if any(step_checks(e, v) is False for e, v in equations):
        out.add("eq-bad")
    if len(calcs) + len(equations) < 2:
        out.add("few-steps")
    low = text.lower()
    if any(h in low for h in _HEDGES):
        out.add("hedge")
    if question is not None:
        asked = {n for n in (_number(x) for x in _NUMBER.findall(question)) if n is not None}
        used = {n for n in (_number(x) for x in _NUMBER.findall(text)) if n is not None}
        if len(asked - used) >= 2:
            out.add("unused-numbers")
    return sorted(out)


__all__ = ["SIGNALS", "final_answer", "recompute", "reply_signals", "step_checks"]
