"""Reading a plan file: never blocking, never more than `MAX_FILE_BYTES`, as strict JSON.

`read_document` refuses a FIFO, a device or a directory before it opens it (opening a FIFO
waits for a writer, /dev/zero never ends), refuses text that is not UTF-8, and parses JSON
so that NaN, Infinity, numbers no float holds and keys named twice in one object reach the
schema marked (`Token`, `Repeated`), to be refused with the name of their field.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections import Counter
from typing import Any

from partitioner.errors import PlanError
from partitioner.planner.schema import MAX_DEPTH, MAX_DIGITS, REMAKE, Repeated, Token

__all__ = ["MAX_FILE_BYTES", "read_document"]

#: A plan holds one ~40-byte line per graph node: a 100-layer transformer's is ~0.5 MB.
#: 64 MiB is over 100 times that, and bounds what a wrong path can make a loader hold.
MAX_FILE_BYTES = 64 * 2**20
_OPEN = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def read_document(path: str | os.PathLike[str]) -> Any:
    """The parsed JSON of the plan file at ``path``; PlanError, and only that, if not."""
    text, name = _read_text(path)
    return _parse(text, name)


_NOT_REGULAR = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (a named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _regular(info: os.stat_result, name: str) -> None:
    """Refuse what is not a regular file of at most MAX_FILE_BYTES (it might never end)."""
    if not stat.S_ISREG(info.st_mode):
        kind = next((w for test, w in _NOT_REGULAR if test(info.st_mode)), "a special file")
        raise PlanError(
            f"plan file {name} is {kind}, not a regular file: pass the path of a plan file "
            f"written by `modelsplit plan`"
        )
    if info.st_size > MAX_FILE_BYTES:
        raise _too_big(name, f"{info.st_size / 2**20:.1f} MiB")


def _too_big(name: str, size: str) -> PlanError:
    return PlanError(
        f"plan file {name} holds {size}, over the {MAX_FILE_BYTES >> 20} MiB a plan file may "
        f"hold: pass the right file, or {REMAKE}"
    )


def _unreadable(name: str, error: Exception) -> PlanError:
    reason = getattr(error, "strerror", None) or str(error)
    return PlanError(f"cannot read plan file {name}: {reason}; check the path, or {REMAKE}")


def _read_text(path: str | os.PathLike[str]) -> tuple[str, str]:
    """The text of the plan file at ``path`` and its name for messages; never blocks."""
    try:
        name = repr(os.fspath(path))
    except TypeError:
        raise PlanError(
            f"a plan file's path must be a str or os.PathLike, not {type(path).__name__}: "
            f"pass the path of a file written by `modelsplit plan`"
        ) from None
    try:
        info = os.stat(path)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise _unreadable(name, e) from e
    _regular(info, name)  # before opening it: opening a FIFO waits for a writer
    try:
        fd = os.open(path, _OPEN)  # O_NONBLOCK: should the path have become a FIFO since
    except (OSError, ValueError) as e:
        raise _unreadable(name, e) from e
    with open(fd, "rb") as f:
        try:
            _regular(os.fstat(fd), name)  # the path may name another file since the stat
            data = f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            raise _unreadable(name, e) from e
    if len(data) > MAX_FILE_BYTES:
        raise _too_big(name, f"more than {MAX_FILE_BYTES >> 20} MiB")
    try:
        return data.decode("utf-8-sig"), name
    except UnicodeDecodeError as e:
        raise PlanError(
            f"plan file {name} is not UTF-8 text (byte {data[e.start]:#04x} at offset "
            f"{e.start}): save it as UTF-8, or {REMAKE}"
        ) from None


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object; one that names a key twice is marked for the schema to refuse."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        obj = Repeated(obj)
        obj.repeated = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
    return obj


def _float(text: str) -> Any:
    value = float(text)
    return value if math.isfinite(value) else Token(text)  # 1e999 parses as inf


def _int(text: str) -> Any:
    return int(text) if len(text.lstrip("-")) <= MAX_DIGITS else Token(text)


def _parse(text: str, name: str) -> Any:
    """Strict JSON: NaN, Infinity, huge numbers and repeated keys reach the schema marked."""
    try:
        return json.loads(
            text,
            object_pairs_hook=_pairs,
            parse_constant=Token,
            parse_float=_float,
            parse_int=_int,
        )
    except json.JSONDecodeError as e:
        raise PlanError(
            f"plan file {name} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
            f"{REMAKE}"
        ) from None
    except RecursionError:
        raise PlanError(
            f"plan file {name} nests deeper than the {MAX_DEPTH} levels a plan may: {REMAKE}"
        ) from None
