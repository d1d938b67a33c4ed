"""benchmarks/scale.py's in-process measurements, each run in a forked child (scale_runner) so that this
process never starts a torch or BLAS thread pool before it forks the stages:

- `save_teacher`: the randomly initialised proxy teacher, as a pipeline model file;
- `teacher_rates`: bare two-view (image + flip) forward rates of the proxy and of the real teacher
  architecture at the same input size, images per second on one thread;
- `sample_error`: build-pools with `--threshold-rows S` (pools' row sampling) against the exact thresholds: the
  FPR each sampled threshold really has, counted over ALL negative pairs in one blockwise scan.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from scale_runner import pipeline_command, run_child

FORWARD_BATCH = {"proxy": 64, "reference": 4}


def _in_child(function, log: Path, result: Path, *args) -> dict:
    def target() -> None:
        import torch

        torch.set_num_threads(1)
        result.write_text(json.dumps(function(*args)))
    run = run_child(target, log)
    if run.rc != 0:
        raise SystemExit(f"{function.__name__} failed (exit {run.rc}):\n{run.tail}")
    return json.loads(result.read_text())


def _pooled_teacher(size: int):
    """A near-free stand-in teacher (TorchScript): 8x8 average pooling, a fixed random projection to 512-d.
    Extraction then measures the pipeline (decode, preprocess, write), not a network."""
    import torch
    from torch import nn

    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("p", torch.randn(3 * 64, 512, generator=torch.Generator().manual_seed(0)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.adaptive_avg_pool2d(x, 8).flatten(1) @ self.p

    return torch.jit.script(Pooled())


def _save(path: str, arch: str, width: float, size: int) -> dict:
    import torch

    from pipeline.models import get_model
    from pipeline.models.model_file import save_model

    torch.manual_seed(0)
    if arch == "pooled":
        torch.jit.save(_pooled_teacher(size), path)
        return {"input_size": size, "num_features": 512}
    kwargs = {"input_size": size, "width": width, "num_features": 512}
    save_model(path, get_model(arch, **kwargs).eval(), arch, kwargs)
    return kwargs


def save_teacher(path: Path, arch: str, width: float, size: int, log: Path) -> dict:
    return _in_child(_save, log, path.with_suffix(".json"), str(path), arch, width, size)


def _forward_rate(model, size: int, batch: int) -> float:
    import torch

    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        model(torch.cat([x[:2], x[:2].flip(3)]))  # warm-up
        started = time.perf_counter()
        model(torch.cat([x, x.flip(3)]))
    return batch / (time.perf_counter() - started)


def _rates(teacher: str, reference: str, size: int) -> dict:
    import torch

    from pipeline.models import get_model
    from pipeline.models.model_file import load_model

    if teacher.endswith(".ts"):
        model, info = torch.jit.load(teacher), {"arch": "pooled (TorchScript)"}
    else:
        model, info = load_model(teacher)
    rates = {"proxy": _forward_rate(model.eval(), size, FORWARD_BATCH["proxy"])}
    if reference:
        rates[reference] = _forward_rate(get_model(reference, input_size=size).eval(), size,
                                         FORWARD_BATCH["reference"])
    return {"images_per_s": {k: round(v, 2) for k, v in rates.items()}, "views": 2, "threads": 1,
            "proxy": f"{info['arch']} {json.dumps(info.get('arch_kwargs', {}))}"}


def teacher_rates(teacher: Path, reference: str, size: int, log: Path) -> dict:
    return _in_child(_rates, log, teacher.with_name("rates.json"), str(teacher), reference, size)


def _true_fprs(cache: str, thresholds: dict[str, dict[str, float]], block_rows: int) -> dict:
    """For each named set of thresholds: the fraction of ALL negative pairs above each threshold."""
    from pipeline.cache.format import TeacherCache
    from pipeline.search.backends import scan_engine
    from pipeline.search.layout import PairLayout, scan_negatives
    from pipeline.search.pools import read_normalised

    source = TeacherCache.open(cache)
    try:
        rows = np.arange(len(source), dtype=np.int64)
        emb = np.concatenate([chunk[:, 0] for _, chunk in read_normalised(source, rows, (0,))])
        layout = PairLayout.build(emb, np.asarray(source.labels))
    finally:
        source.close()
    del emb
    names = [(name, key) for name, values in thresholds.items() for key in values]
    t = np.array([thresholds[name][key] for name, key in names], np.float32)
    low = float(np.min([thresholds[name][key] for name, key in names if key != "1e-1"]))
    wide = [i for i, (_, key) in enumerate(names) if key == "1e-1"]
    counts = np.zeros(len(names), np.int64)
    for s, _, _ in scan_negatives(layout, scan_engine("numpy"), block_rows):
        top = np.sort(s[s > low])
        counts += top.size - np.searchsorted(top, t, side="right")
        for i in wide:  # 1e-1 thresholds sit below `low`: counted on the whole block
            counts[i] = counts[i] - (top.size - np.searchsorted(top, t[i], side="right")) + np.count_nonzero(s > t[i])
    out: dict[str, dict[str, float]] = {name: {} for name in thresholds}
    for (name, key), c in zip(names, counts):
        out[name][key] = float(c) / layout.n_neg
    return {"n_neg": int(layout.n_neg), "true_fpr": out}


def _thresholds(pools: Path) -> dict[str, float]:
    """thresholds.json's {"1e-1": t, ...} (its other entries - tpr, ranks, counts - left out)."""
    document = json.loads((pools / "thresholds.json").read_text())
    return {key: value for key, value in document.items() if key.startswith("1e-")}


def sample_error(cache: Path, pools: Path, samples: list[int], pools_argv: list[str], sample_option: str,
                 block_rows: int, log: Path, count: bool = True) -> dict:
    """build-pools --threshold-rows S for each S (timed), then the true FPR of every threshold, exact ones included."""
    found = {"exact": _thresholds(pools)}
    seconds = {}
    for sample in samples:
        out = pools.with_name(f"pools_sample{sample}")
        run = run_child(pipeline_command(["build-pools", "--cache", cache, "--out", out, *pools_argv,
                                          sample_option, sample]), log)
        if run.rc != 0:
            raise SystemExit(f"build-pools {sample_option} {sample} failed:\n{run.tail}")
        seconds[str(sample)] = round(run.wall_s, 2)
        found[str(sample)] = _thresholds(out)
    started = time.perf_counter()
    if count:
        true = _in_child(_true_fprs, log, pools.with_name("true_fpr.json"), str(cache), found, block_rows)
    else:
        true = {"n_neg": None, "true_fpr": {name: {k: _interpolated_fpr(found["exact"], t) for k, t in values.items()}
                                            for name, values in found.items()}}
    ratio = {name: {key: None if v is None else round(v / float(key), 3) for key, v in fprs.items()}
             for name, fprs in true["true_fpr"].items()}
    return {"samples": samples, "sample_wall_s": seconds, "thresholds": found, "n_neg": true["n_neg"],
            "true_fpr_over_target": ratio, "true_fpr": "counted" if count else "interpolated",
            "count_scan_s": round(time.perf_counter() - started, 1)}


def _interpolated_fpr(exact: dict[str, float], t: float) -> float | None:
    """The FPR of threshold t read off the exact thresholds: log10(FPR) linear in t between the two exact
    thresholds around t (the end segments extended). The cheap stand-in for counting every negative."""
    points = sorted((value, math.log10(float(key))) for key, value in exact.items())  # t ascending, FPR falling
    segments = list(zip(points, points[1:]))
    for index, ((t0, f0), (t1, f1)) in enumerate(segments):
        first, last = index == 0, index == len(segments) - 1
        if (t0 <= t or first) and (t <= t1 or last):  # the end segments extend a little beyond 1e-1 / 1e-6
            return 10 ** (f0 + (f1 - f0) * (t - t0) / (t1 - t0)) if t1 > t0 else 10 ** f0
    return None
