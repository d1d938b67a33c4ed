"""Training history in DVCLive: one timeline whose step is the optimiser step.

`train/*` (losses, learning rate) and the KD diagnostics (`kd/*`) are logged every few steps, the epoch
summaries (`epoch/*`) and the per-epoch evaluation (`eval/*`) at each epoch's last step. A resumed run keeps
the history up to its checkpoint and continues it: rows a killed run logged after the checkpoint are dropped
first, so the history equals the uninterrupted run's.

A damaged history file on resume (garbage bytes, a wrong field count, a non-numeric or non-finite value):
rows after the checkpoint are replaced anyway, so damage there (steps increase down a file: any line after a
row at or past the resume step) is dropped with them. Damage before it is one DataError naming the file and
line: those rows are not logged again, and dropping them would leave a history that looks complete but is not.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.errors import DataError
from pipeline.storage.io import disk_full_is_one_line, refuse_symlinks_under, write_text_atomic


class RunLog:
    """DVCLive under `run_dir/dvclive`; `resume_step` is the first step still to come (0 = a fresh run)."""

    def __init__(self, run_dir: Path, resume_step: int = 0):
        from dvclive import Live

        self.dir = Path(run_dir) / "dvclive"
        # DVCLive empties (a fresh run) or rewrites (a resume) this folder: never files a link leads to
        refuse_symlinks_under(self.dir, "the training history")
        if resume_step > 0:
            truncate_history(self.dir, resume_step)
        with disk_full_is_one_line(self.dir):
            self.live = Live(dir=str(self.dir), resume=resume_step > 0, dvcyaml=None, save_dvc_exp=False,
                             report=None)

    def log(self, step: int, group: str, metrics: dict) -> None:
        """Log finite numbers of `metrics` as `group/name` at `step` and refresh metrics.json."""
        self.live.step = int(step)
        with disk_full_is_one_line(self.dir):
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
                    self.live.log_metric(f"{group}/{name}", float(value))
            self.live.make_summary()

    def close(self) -> None:
        with disk_full_is_one_line(self.dir):
            self.live.end()


def truncate_history(live_dir: Path, first_dropped_step: int) -> None:
    """Remove the rows at steps >= `first_dropped_step` (and a row torn by a kill) from every metrics history
    of a DVCLive folder, and rebuild its summary (metrics.json, which a kill may also have torn) from what is
    left, as DVCLive would have written it at that point."""
    summary: dict = {}
    last_step = None
    root = live_dir / "plots" / "metrics"
    for path in sorted(root.rglob("*.tsv")):
        name = path.relative_to(root).with_suffix("").parts
        lines = path.read_bytes().split(b"\n")[:-1]  # without the "" after the last newline, or the torn line
        if not lines:
            continue
        header, kept = _kept_rows(path, lines, name[-1], first_dropped_step)
        step = header.index("step")
        write_text_atomic(path, "".join("\t".join(row) + "\n" for row in [header, *kept]))
        if kept:
            _set_in(summary, name, float(kept[-1][header.index(name[-1])]))
            last_step = max(int(kept[-1][step]), last_step if last_step is not None else -1)
    if last_step is not None:
        summary["step"] = last_step
    metrics = live_dir / "metrics.json"
    if summary:
        write_text_atomic(metrics, json.dumps(summary, indent=4) + "\n")
    else:
        metrics.unlink(missing_ok=True)


def _kept_rows(path: Path, lines: list[bytes], metric: str, first_dropped_step: int):
    """(header, the rows at steps < first_dropped_step); DataError for a damaged line among them."""
    header = _fields(lines[0])
    if header is None or "step" not in header or metric not in header:
        raise DataError(f"{path} line 1: not a DVCLive header with columns step and {metric}; delete the run's "
                        "dvclive/ folder to drop its history, or use --no-resume")
    kept, step = [], header.index("step")
    for number, raw in enumerate(lines[1:], 2):
        row = _fields(raw)
        values = _numbers(row) if row is not None and len(row) == len(header) else None
        if values is None or not (row[step].isascii() and row[step].isdigit()):
            raise DataError(f"{path} line {number}: damaged row ({raw[:40]!r}) before the resume step "
                            f"{first_dropped_step}, so not logged again; delete the line (its step is then missing "
                            "from the history) or use --no-resume")
        if int(row[step]) >= first_dropped_step:
            break  # this row and every later one are logged again by the resumed run
        kept.append(row)
    return header, kept


def _fields(raw: bytes) -> list[str] | None:
    try:
        return raw.decode("utf-8").split("\t")
    except UnicodeDecodeError:
        return None


def _numbers(row: list[str]) -> list[float] | None:
    """The row's finite values (DVCLive logs only those; `RunLog.log` skips NaN), None if any is not one."""
    try:
        values = [float(field) for field in row]
    except ValueError:
        return None
    return values if all(math.isfinite(v) for v in values) else None


def _set_in(tree: dict, keys: tuple[str, ...], value: float) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value
