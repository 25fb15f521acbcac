"""The fields of a plan file, `modelsplit.plan/2` (and /1): declared in `PLAN`, checked by `check`.

[Note: plan schema]
`PLAN` gives each field a kind (`Str`, `Num`, `Int`, `Bool`, `Array`, `Obj`, `Map`, ...:
`partitioner.planner.kinds`) and its constraints; `check` walks a parsed document against it
and returns a fresh copy of exactly what the document says, never a coercion (no
`str(None)`, no `int(1.5)`). What a table cannot say (stage s on devices[s % K], K *
virtual_stages stages, unique device names, stage indices in range, no empty stage, a K x K
bandwidth matrix, a schedule that runs on K devices, the training fields of an inference
plan left at their defaults) `partitioner.planner.links` checks next.
A refusal is one `PlanError` line naming the field (``stages[2].device``) and the fix.
`planfile.py` parses NaN, Infinity, overflowing numbers and repeated keys into `Token` and
`Repeated` objects, so that those errors name their field too. Hand-written, not jsonschema
or pydantic: half the rules are links, every message carries its fix, jsonschema adds five
packages at ~5 us per assignment entry, and pydantic's lax mode coerces what must be refused.

[Note: plan schema versions]
`modelsplit.plan/2` adds the training fields (`schedule`, `virtual_stages`, `checkpoint`,
`step_time`, `peak_memory`, `notes`). A plan is written in the oldest version that holds
it: an inference plan, whose training fields are at their defaults (`INFERENCE`), as
`modelsplit.plan/1`, byte for byte as before (so older readers still read it), a training
plan as version 2. A version-1 file is checked against the fields it had (`PLAN_1`: a new
field in it is refused) and loads with the training fields at their inference defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from partitioner.errors import PlanError
from partitioner.planner.kinds import (
    MAX_DEPTH,
    MAX_DIGITS,
    AnyOf,
    Array,
    Bool,
    Int,
    Invalid,
    Json,
    Map,
    Nullable,
    Num,
    Obj,
    Repeated,
    Str,
    Token,
    key_path,
    shown,
)
from partitioner.planner.schedules import SCHEDULES

__all__ = [
    "INFERENCE",
    "MAX_DEPTH",
    "MAX_DIGITS",
    "PLAN",
    "PLAN_1",
    "REMAKE",
    "SCHEMA",
    "SCHEMA_2",
    "STATUSES",
    "Repeated",
    "Token",
    "check",
    "key_path",
    "refusal",
    "shown",
]

#: The version an inference plan is written in, as it always was, and the version that adds
#: the training fields ([Note: plan schema versions]).
SCHEMA, SCHEMA_2 = "modelsplit.plan/1", "modelsplit.plan/2"

#: Statuses a plan may carry: proven within the requested gap; a solution without
#: that proof; the best heuristic when the ILP found nothing; a baseline policy.
STATUSES = ("optimal", "feasible", "heuristic", "baseline")
OBJECTIVES = ("throughput", "balanced-cut")
REMAKE = "re-create the file with `modelsplit plan`"

#: The training fields of an inference plan (and of a version-1 file, which has none).
INFERENCE: dict[str, Any] = {
    "schedule": None,
    "virtual_stages": 1,
    "checkpoint": False,
    "step_time": None,
    "peak_memory": None,
    "notes": [],
}

DEVICE = Obj(
    {"name": Str(nonempty=True), "memory": Nullable(Int()), "speed": Num(positive=True)},
    "a device",
)
STAGE = Obj(
    {
        "device": Str(nonempty=True),
        "nodes": Int(1),
        "time": Num(),
        "in_bytes": Int(),
        "cost": Num(),
        "param_bytes": Int(),
        "act_bytes": Int(),
        "first": Nullable(Str()),
        "last": Nullable(Str()),
    },
    "a stage",
)
TENSOR = Obj(
    {"path": Str(), "shape": Array(Int()), "dtype": Str(nonempty=True)}, "a tensor", "shape"
)
CONSTANT = Obj({"path": Str(), "value": Str()}, "a constant", "value")


def _plan(schema: str, training: bool) -> Obj:
    """The table of one version's fields, in the order `Plan.save` writes them."""
    new: dict[str, Any] = {
        "schedule": Nullable(Str(*SCHEDULES)),
        "virtual_stages": Int(1),
        "checkpoint": Bool(),
        "step_time": Nullable(Num()),
        "peak_memory": Nullable(Array(Int())),
    }
    fields: dict[str, Any] = {
        "schema": Str(schema),
        "model": Str(),
        "objective": Str(*OBJECTIVES),
        "status": Str(*STATUSES),
        "solver": Str(nonempty=True),
        "solve_time": Num(),
        "bottleneck": Num(),
        "comm_bytes": Int(),
        "lower_bound": Num(),
        "gap": Num(0, 1),
        "bandwidth": AnyOf(Num(positive=True), Array(Array(Num()), 1)),
        "chunks": Int(1),
        **(new if training else {}),
        "signature": Array(AnyOf(TENSOR, CONSTANT)),
        "devices": Array(DEVICE, 1),
        "stages": Array(STAGE, 1),
        "assignment": Map(Int(), "an object {node name: stage index}"),
        **({"notes": Array(Str())} if training else {}),
        "meta": Map(Json(MAX_DEPTH - 2), "an object of notes"),
    }
    return Obj(fields, "a plan", of=schema)


#: Every field of a plan file (version 2), in the order `Plan.save` writes them.
PLAN = _plan(SCHEMA_2, training=True)
#: The fields of a version-1 plan file.
PLAN_1 = _plan(SCHEMA, training=False)


def check(data: Any) -> dict[str, Any]:
    """The fields of a plan document (parsed JSON or a dict) as a checked copy, with the
    training fields at their inference defaults for a version-1 document.

    Raises PlanError, and only PlanError, naming the field and the fix.
    """
    if not isinstance(data, Mapping):
        raise PlanError(f"a plan must be a JSON object, not {shown(data)}: {REMAKE}")
    version = data.get("schema", SCHEMA_2)
    if not (isinstance(version, str) and version in (SCHEMA, SCHEMA_2)):
        raise PlanError(
            f"unknown plan schema {shown(version)}: this version reads {SCHEMA!r} and "
            f"{SCHEMA_2!r}; {REMAKE} of this version"
        )
    table = PLAN if version == SCHEMA_2 else PLAN_1
    try:
        plan: dict[str, Any] = table.check(data)
    except Invalid as e:
        raise refusal(_path(e.where), e.problem, e.fix) from None
    if version == SCHEMA:
        plan.update({k: list(v) if isinstance(v, list) else v for k, v in INFERENCE.items()})
    return plan


def refusal(path: str, problem: str, fix: str) -> PlanError:
    """The one line that refuses field ``path`` (e.g. ``stages[2].device``)."""
    path = path if len(path) <= 100 else f"{path[:60]}...{path[-37:]}"
    subject = f"plan field {path!r}" if path else "the plan"
    return PlanError(f"{subject} {problem}: {fix}, or {REMAKE}")


def _path(where: list[str | int]) -> str:
    """An error's path (fields, indices, Map keys; innermost last) as ``stages[2].device``."""
    text = ""
    for part in reversed(where):
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.startswith("["):  # a key of a Map, as key_path wrote it
            text += part
        else:
            text += f".{part}" if text else part
    return text
