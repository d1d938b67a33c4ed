"""Result files read back (metrics.json, roc.csv, <target>.json, DVCLive .tsv), each value checked: a damaged
file (truncated, garbage bytes, a wrong type, NaN, a missing column) is one DataError naming the file and the
key or row, never a traceback or a report built on garbage. TPR standard errors and resolution flags are read
as stored, or derived from the pair counts of a file written before they were stored."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from pipeline.errors import DataError
from pipeline.evaluation.uncertainty import readout_uncertainty


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


def flag(path: Path, where: str, value: Any) -> bool:
    """`value` as a JSON boolean."""
    if not isinstance(value, bool):
        raise DataError(f"{path}: {where} is {value!r}, expected true or false")
    return value


def _keyed(path: Path, where: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{path}: {where} is {value!r}, expected an object keyed by FPR")
    return value


def read_uncertainty(path: Path, where: str, section: dict, tprs: dict[str, float]
                     ) -> tuple[dict[str, float], dict[str, bool]]:
    """`(standard error, resolved)` per FPR key of the TPRs `tprs` of a metrics section (`where`: its name in
    messages, "" for the top level): the stored `tpr_se` / `resolved`, checked; for a file written before they
    were stored, derived from its pair counts; empty when it has neither."""
    if "tpr_se" in section or "resolved" in section:
        se = {k: number(path, f"{where}tpr_se.{k}", v, 0, 0.5)
              for k, v in _keyed(path, f"{where}tpr_se", section.get("tpr_se", {})).items()}
        resolved = {k: flag(path, f"{where}resolved.{k}", v)
                    for k, v in _keyed(path, f"{where}resolved", section.get("resolved", {})).items()}
        for k, v in _keyed(path, f"{where}impostor_pairs", section.get("impostor_pairs", {})).items():
            number(path, f"{where}impostor_pairs.{k}", v, 0, integer=True)
        return se, resolved
    counts = [section.get(k) for k in ("positive_pairs", "negative_pairs")]
    if any(c is None for c in counts):
        return {}, {}
    genuine, impostors = (number(path, f"{where}{k}", c, 0, integer=True)
                          for k, c in zip(("positive_pairs", "negative_pairs"), counts))
    derived = readout_uncertainty({float(k): v for k, v in tprs.items()}, genuine, impostors)
    return derived["tpr_se"], derived["resolved"]
