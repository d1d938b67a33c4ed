"""Result files read back (metrics.json, roc.csv, <target>.json, DVCLive .tsv), each value checked: a damaged
file (truncated, garbage bytes, a wrong type, NaN, a missing column) is one DataError naming the file and the
key or row, never a traceback or a report built on garbage."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from pipeline.errors import DataError


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object."""
    try:
        value = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:  # JSONDecodeError is a ValueError
        raise DataError(f"{path}: not a readable JSON file ({type(error).__name__}: {error}); rerun the stage "
                        "that writes it") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object, found a {type(value).__name__}")
    return value


def number(path: Path, where: str, value: Any, low: float = -math.inf, high: float = math.inf,
           integer: bool = False, infinite: bool = False) -> float:
    """`value` as a number in [low, high] (an int when `integer`; +-inf only when `infinite`)."""
    if isinstance(value, str) and not integer:
        try:
            value = float(value)
        except ValueError:
            pass
    wrong = isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int))
    if not wrong and not (math.isfinite(value) or (infinite and not math.isnan(value))):
        wrong = True
    if wrong or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise DataError(f"{path}: {where} is {value!r}, expected {kind} in [{low:g}, {high:g}]")
    return value


def read_table(path: Path, columns: tuple[str, ...], delimiter: str = ",") -> list[dict[str, str]]:
    """The rows of a CSV/TSV with `columns` present in the header and in every row (values still text)."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            rows = list(reader)
            header = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: not a readable table ({type(error).__name__}: {error})") from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path}: no column {', '.join(missing)} (header {header})")
    for index, row in enumerate(rows, start=2):
        if any(row.get(c) in (None, "") for c in columns):
            raise DataError(f"{path}: line {index} lacks a value of {', '.join(columns)} (truncated?)")
    return rows
