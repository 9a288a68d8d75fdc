"""Job spec files: a JSON list of job specs, or JSON Lines (one spec per line), read strictly.

The client's side of `renderfarm submit --specs FILE`, so a Python caller gets the same reading
(`FarmClient.submit_file`). Every way a file can be wrong is a `SpecFileError` whose message starts with
the path and says where (`jobs[3] (line 5)`, `line 2 column 7`) and what; the CLI puts its flag in front.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from renderfarm.errors import SpecFileError, shown

__all__ = ["read_spec_file", "read_text"]


def read_text(path: str | Path) -> str:
    """The file's text (UTF-8, a BOM dropped); an unreadable or non-UTF-8 file names the path and line."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise SpecFileError(f"{path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # a NUL character in the path
        raise SpecFileError(f"{shown(str(path))}: {exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise SpecFileError(f"{path} line {line}: not UTF-8 text (byte {raw[exc.start]:#04x})") from None


class _DuplicateField(ValueError):
    pass


def _unique_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) < len(pairs):  # json.loads would keep the last value silently
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise _DuplicateField(f"field {shown(twice)} appears twice in one object")
    return found


def _parse_json(text: str) -> Any:
    """json.loads, each way it can fail turned into a ValueError that says what is wrong and where."""
    try:
        return json.loads(text, object_pairs_hook=_unique_fields)
    except json.JSONDecodeError as exc:
        raise ValueError(f"line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg})") from None
    except _DuplicateField:
        raise
    except RecursionError:
        raise ValueError("not valid JSON: nested too deeply") from None
    except ValueError:  # Python parses no integer of more than 4,300 digits
        raise ValueError("not valid JSON: a number has too many digits") from None


def read_spec_file(path: str | Path) -> list[tuple[str, Any]]:
    """(where, spec) for each spec of the file. `where` names the spec in errors: `jobs[3]`, or
    `jobs[3] (line 5)` in JSON Lines. The specs themselves are checked by `FarmClient.validate`."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            return [(f"jobs[{i}]", item) for i, item in enumerate(_parse_json(text))]
        except ValueError as exc:
            raise SpecFileError(f"{path}: {exc}") from None
    entries = []
    # Newlines only: str.splitlines() would also split inside a JSON string holding U+2028.
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                entries.append((f"jobs[{len(entries)}] (line {number})", _parse_json(line)))
            except ValueError as exc:
                raise SpecFileError(f"{path} line {number}: {str(exc).removeprefix('line 1 ')}; expected "
                                    "a JSON list of job specs, or one JSON object per line") from None
    return entries
