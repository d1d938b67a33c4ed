"""Training history in DVCLive: one timeline whose step is the optimiser step.

`train/*` (losses, learning rate) and the KD diagnostics (`kd/*`) are logged every few steps, the epoch
summaries (`epoch/*`) and the per-epoch evaluation (`eval/*`) at each epoch's last step. A resumed run keeps
the history up to its checkpoint and continues it: rows a killed run logged after the checkpoint are dropped
first, so the history equals the uninterrupted run's.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.io import disk_full_is_one_line, refuse_symlinks_under, write_text_atomic


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
    for path in sorted((live_dir / "plots" / "metrics").rglob("*.tsv")):
        text = path.read_text()
        lines = text.split("\n")[:-1]  # without the "" after the last newline, or the torn line instead
        if not lines:
            continue
        header = lines[0].split("\t")
        step = header.index("step")
        kept = [row for row in (line.split("\t") for line in lines[1:])
                if len(row) == len(header) and int(row[step]) < first_dropped_step]
        write_text_atomic(path, "".join("\t".join(row) + "\n" for row in [header, *kept]))
        if kept:
            name = path.relative_to(live_dir / "plots" / "metrics").with_suffix("").parts
            _set_in(summary, name, float(kept[-1][header.index(name[-1])]))
            last_step = max(int(kept[-1][step]), last_step if last_step is not None else -1)
    if last_step is not None:
        summary["step"] = last_step
    metrics = live_dir / "metrics.json"
    if summary:
        write_text_atomic(metrics, json.dumps(summary, indent=4) + "\n")
    else:
        metrics.unlink(missing_ok=True)


def _set_in(tree: dict, keys: tuple[str, ...], value: float) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value
