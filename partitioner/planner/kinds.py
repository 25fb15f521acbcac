"""What a value of a plan file may be: the kinds (`Str`, `Num`, `Int`, `Bool`, `Array`,
`Obj`, `Map`, ...) that `partitioner.planner.schema` declares the plan's fields with.

Each kind's `check` returns a fresh copy of exactly what the document says, never a coercion
(no ``str(None)``, no ``int(1.5)``, no ``True`` read as 1), or raises `Invalid` with the
problem and its fix; the schema adds the field's path ([Note: plan schema]).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "MAX_DEPTH",
    "MAX_DIGITS",
    "MAX_INT",
    "AnyOf",
    "Array",
    "Bool",
    "Invalid",
    "Json",
    "Kind",
    "Map",
    "Nullable",
    "Num",
    "Obj",
    "Repeated",
    "Str",
    "Token",
    "key_path",
    "shown",
]

MAX_DEPTH = 32  #: nesting levels of a whole plan (the declared fields use at most 4)
MAX_INT = 2**63 - 1  #: byte counts, counts and indices fit in 64 bits
MAX_DIGITS = 20  #: digits of an integer anywhere in a plan (2**64 has 20)


class Token:
    """A number JSON does not have (NaN, Infinity, 1e999, 10**30): refused where it stands."""

    def __init__(self, text: str) -> None:
        self.text = text if len(text) <= 24 else f"an integer of {len(text)} digits"


class Repeated(dict):  # type: ignore[type-arg]
    """A JSON object that names the key `repeated` twice (the last copy is kept)."""

    repeated: str = ""


class Invalid(Exception):
    """A refused value; `where` collects its path (fields, indices, `key_path`s) on the way up."""

    def __init__(self, problem: str, fix: str, *where: str | int) -> None:
        super().__init__(problem)
        self.problem, self.fix, self.where = problem, fix, list(reversed(where))

    def at(self, part: str | int) -> Invalid:
        self.where.append(part)
        return self


def shown(value: Any) -> str:
    """A value for a one-line message, at most ~60 characters."""
    if isinstance(value, Token):
        return value.text
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)}"
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    if value is None or isinstance(value, int | float | str):
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:56] + '..."'
    return f"a Python {type(value).__name__}"


def _wrong(value: Any, want: str) -> Invalid:
    if isinstance(value, Token):
        return Invalid(f"is {value.text}, which a plan cannot hold", f"write {want}")
    return Invalid(f"has the wrong type ({shown(value)})", f"write {want}")


def _text(value: str) -> str:
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise Invalid("holds a lone surrogate, which is not text", "write text") from None
    return value


class Kind:
    """What one JSON value must be: `want` says it in words, `check` returns a copy."""

    want = "a JSON value"
    types: tuple[type, ...] = (object,)  # the Python types of its JSON type

    def fits(self, value: Any) -> bool:
        """Whether the value has this kind's JSON type (how `AnyOf` picks a kind)."""
        return isinstance(value, self.types) and not isinstance(value, bool | Token)

    def check(self, value: Any) -> Any:
        raise NotImplementedError


class Str(Kind):
    types = (str,)

    def __init__(self, *choices: str, nonempty: bool = False) -> None:
        self.choices, self.nonempty = choices, nonempty
        self.want = "a non-empty string" if nonempty else "a string"
        if choices:
            self.want = "one of " + ", ".join(json.dumps(c) for c in choices)

    def check(self, value: Any) -> Any:
        if not isinstance(value, str):
            raise _wrong(value, self.want)
        if (self.nonempty and not value) or (self.choices and value not in self.choices):
            raise Invalid(f"is {shown(value)}", f"write {self.want}")
        return _text(value)


class Num(Kind):
    """A finite number in [minimum, maximum] (above minimum when `positive`)."""

    types = (int, float)
    whole = False

    def __init__(
        self, minimum: float = 0, maximum: float = math.inf, *, positive: bool = False
    ) -> None:
        self.minimum, self.maximum, self.positive = minimum, maximum, positive
        top = "" if maximum == math.inf else f" and <= {maximum:g}"
        self.want = f"a finite number {'>' if positive else '>='} {minimum:g}{top}"

    def check(self, value: Any) -> Any:
        if not self.fits(value):
            raise _wrong(value, self.want)
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if self.whole:
            ok = math.isfinite(number) and number.is_integer()
            ok = ok and self.minimum <= int(value) <= MAX_INT
        else:
            low = number > self.minimum if self.positive else number >= self.minimum
            ok = math.isfinite(number) and low and number <= self.maximum
        if not ok:
            raise Invalid(f"is {shown(value)}", f"write {self.want}")
        return int(value) if self.whole else number


class Int(Num):
    """A whole number below 2**63: JSON has one number type, so 3.0 is 3 and 1.5 is refused."""

    whole = True

    def __init__(self, minimum: int = 0) -> None:
        super().__init__(minimum, MAX_INT)
        self.want = f"a whole number >= {minimum}"


class Bool(Kind):
    """true or false, and only those: 1 and "true" are refused."""

    types = (bool,)
    want = "true or false"

    def fits(self, value: Any) -> bool:
        return isinstance(value, bool)

    def check(self, value: Any) -> Any:
        if not isinstance(value, bool):
            raise _wrong(value, self.want)
        return value


class Nullable(Kind):
    def __init__(self, kind: Kind) -> None:
        self.kind, self.want = kind, f"{kind.want} or null"

    def fits(self, value: Any) -> bool:
        return value is None or self.kind.fits(value)

    def check(self, value: Any) -> Any:
        return None if value is None else self.kind.check(value)


class Array(Kind):
    types = (list, tuple)

    def __init__(self, item: Kind, min_items: int = 0) -> None:
        self.item, self.min_items = item, min_items
        self.want = f"a list of {f'at least {min_items} ' if min_items else ''}({item.want})"

    def check(self, value: Any) -> Any:
        if not self.fits(value):
            raise _wrong(value, self.want)
        if len(value) < self.min_items:
            raise Invalid(f"is {shown(value)}", f"write {self.want}")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(self.item.check(item))
            except Invalid as e:
                raise e.at(i) from None
        return out


def _object(value: Any, want: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise _wrong(value, want)
    if isinstance(value, Repeated):
        problem = f"names {shown(value.repeated)} twice (JSON readers disagree on which wins)"
        raise Invalid(problem, "keep one")
    return value


class Obj(Kind):
    """An object with exactly these fields; `tag` is the field that tells it in an `AnyOf`."""

    types = (Mapping,)

    def __init__(
        self, fields: Mapping[str, Kind], what: str, tag: str | None = None, of: str = ""
    ) -> None:
        self.fields, self.tag, self.of = fields, tag, of or what
        self.want = f"{what} with the fields {', '.join(fields)}"

    def fits(self, value: Any) -> bool:
        return super().fits(value) and (self.tag is None or self.tag in value)

    def check(self, value: Any) -> Any:
        value = _object(value, self.want)
        for key in value:
            if key not in self.fields:
                name = key if isinstance(key, str) else shown(key)
                raise Invalid(f"is not a field of {self.of}", "remove it", name)
        out = {}
        for name, kind in self.fields.items():
            if name not in value:
                raise Invalid("is missing", f"add it ({kind.want})", name)
            try:
                out[name] = kind.check(value[name])
            except Invalid as e:
                raise e.at(name) from None
        return out


class Map(Kind):
    """An object whose keys are names of the writer's choosing, each with a `value`."""

    types = (Mapping,)

    def __init__(self, value: Kind, what: str) -> None:
        self.value, self.want = value, f"{what} (values: {value.want})"

    def check(self, value: Any) -> Any:
        out = {}
        for key, item in _object(value, self.want).items():
            if not isinstance(key, str):
                raise Invalid(f"has a key that is not a string ({shown(key)})", "use names")
            try:
                out[_text(key)] = self.value.check(item)
            except Invalid as e:
                raise e.at(key_path(key)) from None
        return out


class AnyOf(Kind):
    """The first of `kinds` that `fits` the value decides."""

    def __init__(self, *kinds: Kind) -> None:
        self.kinds, self.want = kinds, " or ".join(k.want for k in kinds)

    def check(self, value: Any) -> Any:
        kind = next((k for k in self.kinds if k.fits(value)), None)
        if kind is None:
            raise _wrong(value, self.want)
        return kind.check(value)


class Json(Kind):
    """Free-form JSON (the planner's notes) nested at most `depth` levels more."""

    want = "JSON: null, true, false, a finite number, a string, a list or an object"

    def __init__(self, depth: int) -> None:
        self.depth = depth

    def check(self, value: Any) -> Any:
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str):
            return _text(value)
        if isinstance(value, int) and abs(value) >= 10**MAX_DIGITS:
            raise Invalid(f"is {shown(value)}", f"write at most {MAX_DIGITS} digits")
        if isinstance(value, int | float):
            return Num(-math.inf).check(value) if isinstance(value, float) else value
        if not isinstance(value, list | tuple | Mapping):
            raise _wrong(value, "a finite number" if isinstance(value, Token) else self.want)
        if self.depth <= 0:
            raise Invalid(f"nests deeper than the {MAX_DEPTH} levels a plan may", "flatten it")
        inner = Json(self.depth - 1)
        if isinstance(value, Mapping):
            return Map(inner, "an object").check(value)
        return Array(inner).check(value)


def key_path(key: str) -> str:
    """A `Map` key as a path part: ``["layers.0"]`` (cut to ~40 characters)."""
    text = json.dumps(key)
    return f"[{text if len(text) <= 40 else text[:36] + '...' + text[-1]}]"
