"""The manager's plan: subtasks with a difficulty and dependencies, validated before use.

A plan is a model's output, so it is checked at the edge: parsed tolerantly
(:func:`parse_plan_text` finds the JSON in prose or a fenced block), validated
into pydantic models, then checked as a whole (:func:`validate_plan`: ids,
dependencies, cycles, size). Anything wrong raises :class:`InvalidPlan` with
every reason, worded so it can be sent back to the model for one repair.

A plan carries no budget. It has no field for tokens, prices or money, and
fields a model adds (``"budget": 1000``, ``"max_tokens": …``) are dropped on
parse and never stored, so nothing downstream can read them. Extra fields are
ignored rather than refused: a plan that is otherwise good should not cost a
repair call because a model was chatty. Budgets come from the policy and the
ledger alone; text inside an instruction is only text for the worker.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections import Counter
from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agents.endpoints import StructuredOutput
from agents.errors import InvalidPlan

MAX_INSTRUCTION_CHARS: Final = 4000
_GRAMMAR_INSTRUCTION_CHARS: Final = 300
FALLBACK_ID: Final = "task"
FALLBACK_DIFFICULTY: Final = 3
ID_PATTERN: Final = r"^[a-z0-9][a-z0-9_-]{0,31}$"

# Keys of a JSON schema kept in what is sent as response_format: OpenAI's strict
# mode rejects keywords it does not support (minLength, maxLength, default, ...).
_SCHEMA_KEYS: Final = frozenset(
    {"type", "description", "pattern", "minimum", "maximum", "minItems", "maxItems", "enum"}
)
# Scanning stops after this much text or this many '{' tried, so garbage stays cheap.
_MAX_SCAN_CHARS: Final = 200_000
_MAX_CANDIDATES: Final = 256

_Tag = Annotated[str, Field(max_length=64)]


class Subtask(BaseModel):
    """One unit of work for a worker; labels and text only, never a budget."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str = Field(pattern=ID_PATTERN, description="short unique id: lowercase, digits, _ or -")
    instruction: str = Field(
        min_length=1,
        max_length=MAX_INSTRUCTION_CHARS,
        description="what the worker must do, self-contained",
    )
    difficulty: int = Field(ge=1, le=5, description="1 trivial ... 5 very hard")
    depends_on: list[str] = Field(
        default_factory=list, description="ids of subtasks whose results this one needs"
    )
    tags: list[_Tag] = Field(default_factory=list, max_length=16, description="short labels")
    composite: bool = Field(
        default=False,
        description="true when the subtask is big enough to be split again into its own subtasks",
    )

    @field_validator("instruction")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


class Plan(BaseModel):
    """The subtasks of a task, in the order the manager wrote them."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    subtasks: list[Subtask]


def validate_plan(plan: Plan, *, max_subtasks: int) -> Plan:
    """Return ``plan`` if it can be run; else raise :class:`InvalidPlan` with every reason.

    Checks: at least one and at most ``max_subtasks`` subtasks, unique ids,
    dependencies that name other subtasks of the plan, and no cycles (each
    cycle found is reported as ``a -> b -> a``).
    """
    if max_subtasks < 1:
        raise ValueError(f"max_subtasks must be at least 1, got {max_subtasks}")
    subs = plan.subtasks
    reasons: list[str] = []
    if not subs:
        reasons.append("the plan has no subtasks; give at least one")
    if len(subs) > max_subtasks:
        reasons.append(
            f"the plan has {len(subs)} subtasks; at most {max_subtasks} are allowed, merge some"
        )
    counts = Counter(s.id for s in subs)
    reasons.extend(
        f"subtask id {sid!r} is used {n} times; ids must be unique"
        for sid, n in counts.items()
        if n > 1
    )
    graph: dict[str, list[str]] = {s.id: [] for s in subs}
    for s in subs:
        for dep in dict.fromkeys(s.depends_on):
            if dep == s.id:
                reasons.append(f"subtask {s.id!r} depends on itself")
            elif dep not in graph:
                reasons.append(f"subtask {s.id!r} depends on unknown subtask {dep[:40]!r}")
            else:
                graph[s.id].append(dep)
    reasons.extend(f"dependency cycle: {' -> '.join(c)}" for c in _cycles(graph))
    if reasons:
        raise InvalidPlan(reasons)
    return plan


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Each distinct cycle met by an iterative depth-first search, closed (``[a, b, a]``)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    found: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    for start in graph:
        if state.get(start):
            continue
        path: list[str] = [start]
        stack = [iter(graph[start])]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                cycle = path[path.index(nxt) :]
                if frozenset(cycle) not in seen:
                    seen.add(frozenset(cycle))
                    found.append([*cycle, nxt])
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(graph[nxt]))
    return found


def waves(plan: Plan) -> list[list[Subtask]]:
    """Topological layers: each subtask's dependencies all sit in earlier waves.

    A subtask lands in the earliest wave it can, and keeps its plan order
    within a wave. Raises :class:`InvalidPlan` for a plan that cannot be run.
    """
    if not plan.subtasks:
        return []
    validate_plan(plan, max_subtasks=len(plan.subtasks))
    done: set[str] = set()
    remaining = list(plan.subtasks)
    layers: list[list[Subtask]] = []
    while remaining:
        ready = [s for s in remaining if all(d in done for d in s.depends_on)]
        layers.append(ready)
        done.update(s.id for s in ready)
        remaining = [s for s in remaining if s.id not in done]
    return layers


def single_subtask_plan(task: str) -> Plan:
    """The fallback plan: one subtask, the task itself, difficulty 3.

    A task too long (or blank) to be an instruction becomes "solve the whole
    task as given": the worker is always shown the full task text as well.
    """
    text = task.strip()
    instruction = (
        text if 0 < len(text) <= MAX_INSTRUCTION_CHARS else "Solve the whole task as given."
    )
    subtask = Subtask(id=FALLBACK_ID, instruction=instruction, difficulty=FALLBACK_DIFFICULTY)
    return Plan(subtasks=[subtask])


def plan_schema(
    *, max_subtasks: int | None = None, grammar: bool = False, nested: bool = False
) -> dict[str, Any]:
    """The JSON schema of a plan (see :func:`_plan_schema`); built once per shape, and a
    copy is returned, so a caller may change its own."""
    return copy.deepcopy(_plan_schema(max_subtasks, grammar, nested))


@functools.lru_cache(maxsize=64)
def _plan_schema(max_subtasks: int | None, grammar: bool, nested: bool) -> dict[str, Any]:
    """The JSON schema of a plan, strict: every object closed and every field required.

    ``composite`` is in it only with ``nested=True`` (the level may plan
    sub-managers); a plan without it has none.

    Built from :class:`Plan` with the keywords OpenAI's strict mode refuses
    dropped. With ``max_subtasks`` the list is bounded and ids are ``s1`` ...
    ``s<max>``; difficulty is an enum either way. ``grammar=True`` (llama.cpp,
    which compiles the schema to a grammar) also bounds every string and list,
    so a small model cannot ramble past a useful plan, and asks for at least
    two subtasks when ``max_subtasks`` allows two.
    """
    schema: dict[str, Any] = _strict(Plan.model_json_schema())
    subtasks = schema["properties"]["subtasks"]
    subtasks["minItems"] = 1
    fields = schema["$defs"]["Subtask"]["properties"]
    fields["difficulty"] = {"type": "integer", "enum": [1, 2, 3, 4, 5]}
    if not nested:
        del fields["composite"]
        required = schema["$defs"]["Subtask"]["required"]
        required.remove("composite")
    if max_subtasks is not None:
        subtasks["maxItems"] = max_subtasks
        ids = [f"s{i}" for i in range(1, max_subtasks + 1)]
        fields["id"] = {"type": "string", "enum": ids}
        fields["depends_on"] = {"type": "array", "items": {"type": "string", "enum": ids}}
    if grammar:
        # A small local model held by a grammar rarely splits on its own, and
        # splitting is the manager's job: ask for two where two are allowed.
        if max_subtasks is not None and max_subtasks >= 2:
            subtasks["minItems"] = 2
        fields["instruction"] |= {"minLength": 8, "maxLength": _GRAMMAR_INSTRUCTION_CHARS}
        fields["tags"] = {
            "type": "array",
            "items": {"type": "string", "maxLength": 24},
            "maxItems": 3,
        }
        if max_subtasks is not None:
            fields["depends_on"]["maxItems"] = max_subtasks
    return schema


def mend_plan(plan: Plan) -> Plan:
    """Fix, for free, what has one obvious fix, so it costs no repair call.

    A repeated id becomes ``s<position>`` (or the next unused ``s<n>``);
    dependencies on the subtask itself, on unknown ids, repeated ones, and
    those that close a cycle are dropped. What has no obvious fix (a blank
    instruction, too many subtasks) is left for :func:`validate_plan` to refuse.
    """
    seen: set[str] = set()
    renamed: list[Subtask] = []
    for position, sub in enumerate(plan.subtasks, start=1):
        new_id = sub.id
        if new_id in seen:
            n = position
            while f"s{n}" in seen or any(s.id == f"s{n}" for s in plan.subtasks):
                n += 1
            new_id = f"s{n}"
        seen.add(new_id)
        renamed.append(sub.model_copy(update={"id": new_id}))
    known = {s.id for s in renamed}
    mended: list[Subtask] = []
    graph: dict[str, list[str]] = {}
    for sub in renamed:
        deps: list[str] = []
        for dep in sub.depends_on:
            if dep == sub.id or dep not in known or dep in deps:
                continue
            trial: dict[str, list[str]] = {s.id: [] for s in renamed} | graph
            trial[sub.id] = [*deps, dep]
            if _cycles(trial):
                continue
            deps.append(dep)
        graph[sub.id] = deps
        mended.append(sub.model_copy(update={"depends_on": deps}))
    return Plan(subtasks=mended)


def response_format(
    mode: StructuredOutput, *, name: str, schema: dict[str, Any]
) -> dict[str, Any] | None:
    """The ``response_format`` that holds an endpoint's reply to ``schema``; ``None`` for text.

    ``json_schema`` is OpenAI's structured outputs; ``json_object`` is llama.cpp's
    form, which compiles the schema to a grammar (see
    :data:`agents.endpoints.StructuredOutput`).
    """
    if mode == "json_schema":
        return {
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": True},
        }
    if mode == "json_object":
        return {"type": "json_object", "schema": schema}
    return None


def plan_json_schema(*, max_subtasks: int | None = None) -> dict[str, Any]:
    """The OpenAI structured-outputs ``response_format`` asking for a plan."""
    fmt = response_format("json_schema", name="plan", schema=plan_schema(max_subtasks=max_subtasks))
    assert fmt is not None
    return fmt


def _strict(node: Any) -> Any:
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "$defs"):
            out[key] = {name: _strict(sub) for name, sub in value.items()}
        elif key in ("items", "anyOf"):
            out[key] = _strict(value)
        elif key in _SCHEMA_KEYS or key == "$ref":
            out[key] = value
    if out.get("type") == "object":
        # A class docstring is for readers of the code, not for the model.
        out.pop("description", None)
        out["additionalProperties"] = False
        out["required"] = list(out.get("properties", {}))
    return out


def first_json_object(text: str, *, key: str | None = None) -> dict[str, Any] | None:
    """The first JSON object in ``text`` (prose, ```json fences and all), or ``None``.

    With ``key``, the first object that has that key wins over earlier ones
    without it; if none has it, the first object is returned.
    """
    decoder = json.JSONDecoder()
    scan = text[:_MAX_SCAN_CHARS]
    first: dict[str, Any] | None = None
    for tried, match in enumerate(re.finditer(r"\{", scan)):
        if tried >= _MAX_CANDIDATES:
            break
        try:
            value, _ = decoder.raw_decode(scan, match.start())
        except ValueError:
            continue
        if not isinstance(value, dict):
            continue
        if key is None or key in value:
            return value
        if first is None:
            first = value
    return first


def parse_plan_text(text: str) -> Plan:
    """A :class:`Plan` from a model's free-text reply; raises :class:`InvalidPlan` if none.

    Takes the first JSON object with a ``subtasks`` key and validates its
    structure; call :func:`validate_plan` for ids, dependencies and size.
    Input values are never echoed in the reasons.
    """
    data = first_json_object(text, key="subtasks")
    if data is None or "subtasks" not in data:
        raise InvalidPlan(
            [
                'the reply holds no JSON object with "subtasks"; reply with one object '
                '{"subtasks": [...]}'
            ]
        )
    try:
        return Plan.model_validate(data)
    except ValidationError as e:
        raise InvalidPlan([_describe(err) for err in e.errors()]) from None


def _describe(err: Any) -> str:
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg
