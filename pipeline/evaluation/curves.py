"""Training histories (the DVCLive files `train` writes) read back and drawn for the report: the per-epoch
evaluation curves of every model, and the KD diagnostics of the students (gradient-norm ratios at the
embeddings, critical pairs per batch, the student's against the teacher's FPR thresholds)."""
from __future__ import annotations

from pathlib import Path

from pipeline.evaluation.readback import number, read_table
from pipeline.storage.io import atomic_path

History = dict[str, tuple[list[int], list[float]]]
CURVES = ("eval/monitor/tpr@fpr=1e-3", "eval/monitor/tpr@fpr=1e-4", "eval/val/accuracy", "epoch/margin_loss")


def read_history(live_dir: Path) -> History:
    """Every metric's (steps, values) from a DVCLive folder, keyed `group/name` (empty when there is none)."""
    out = {}
    root = Path(live_dir) / "plots" / "metrics"
    for path in sorted(root.rglob("*.tsv")):
        rows = read_table(path, ("step", path.stem), delimiter="\t")
        name = path.relative_to(root).with_suffix("").as_posix()
        out[name] = ([int(number(path, f"line {i} step", _integer_text(r["step"]), 0, integer=True))
                      for i, r in enumerate(rows, start=2)],
                     [number(path, f"line {i} {path.stem}", r[path.stem]) for i, r in enumerate(rows, start=2)])
    return out


def _integer_text(text: str):
    """'12' as 12 (anything else stays as it is, for `number` to refuse by name)."""
    return int(text) if text.strip().lstrip("-").isdigit() else text


def run_folders(paths: list[Path]) -> list[Path]:
    """Run folders (holding dvclive/) among `paths` and their sub-folders, in order; missing paths skipped."""
    found = []
    for path in map(Path, paths):
        if (path / "dvclive").is_dir():
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.iterdir() if (p / "dvclive").is_dir())
    return found


def epochs_of(history: History, steps: list[int]) -> list[float]:
    """The epoch (1-based, at its end) of each logged step, from the `epoch/epoch` series."""
    marks = dict(zip(*history.get("epoch/epoch", ([], []))))
    return [marks.get(step, float("nan")) for step in steps]


def _figure(rows: int, columns: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), dpi=110, squeeze=False)
    return plt, figure, axes.ravel()


def _save(plt, figure, path: Path) -> None:
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)


def _placeholder(path: Path, text: str) -> None:
    """A small figure saying why there is nothing to draw (so the report's files always exist)."""
    plt, figure, axes = _figure(1, 1)
    axes[0].text(0.5, 0.5, text, ha="center", va="center", fontsize=10, wrap=True)
    axes[0].set_axis_off()
    _save(plt, figure, path)


def plot_curves(histories: dict[str, History], path: Path) -> bool:
    """Per-epoch curves of every run (monitor TPR@FPR, val accuracy, margin loss) against the epoch; False
    (and a placeholder figure) when no run logged any of them."""
    shown = [key for key in CURVES if any(key in h for h in histories.values())]
    if not shown:
        _placeholder(path, "no training history (dvclive/) among the runs given to the report")
        return False
    plt, figure, axes = _figure(1, len(shown))
    for axis, key in zip(axes, shown):
        for name, history in histories.items():
            if key in history:
                steps, values = history[key]
                axis.plot(epochs_of(history, steps), values, marker=".", label=name)
        axis.set_title(key.split("/", 1)[1], fontsize=9)
        axis.set_xlabel("epoch")
        axis.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    _save(plt, figure, path)
    return True


def plot_diagnostics(histories: dict[str, History], path: Path) -> bool:
    """KD diagnostics against the optimiser step for the runs that logged them; False (and a placeholder
    figure) when none did."""
    runs = {name: h for name, h in histories.items() if any(k.startswith("kd/") for k in h)}
    if not runs:
        _placeholder(path, "no KD diagnostics: no student with a KD loss among the runs given to the report")
        return False
    plt, figure, axes = _figure(len(runs), 3)
    for row, (name, history) in enumerate(runs.items()):
        ratio, pairs, thresholds = axes[3 * row: 3 * row + 3]
        for key, (steps, values) in history.items():
            if key.startswith("kd/grad_ratio_"):
                ratio.plot(steps, values, label=key.removeprefix("kd/grad_ratio_"))
            elif key.endswith(("pairs_critical_positive", "pairs_critical_negative")):
                pairs.plot(steps, values, label=key.rsplit("_", 1)[1])
            elif "/threshold_" in key:
                who, level = key.rsplit("threshold_", 1)[1].split("_")
                thresholds.plot(steps, values, linestyle="-" if who == "student" else "--",
                                label=f"{who} {level}", linewidth=1)
        ratio.set_yscale("log")
        for axis, title in ((ratio, "KD / margin gradient norm at the embeddings"),
                            (pairs, "critical pairs per batch"), (thresholds, "FPR thresholds (cosine)")):
            axis.set_title(f"{name}: {title}", fontsize=9)
            axis.set_xlabel("step")
            axis.grid(True, alpha=0.3)
            if axis.lines:
                axis.legend(fontsize=6, ncol=2)
    _save(plt, figure, path)
    return True
