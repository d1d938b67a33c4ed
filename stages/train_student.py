"""`pipeline train-student`: a student trained on the cached teacher targets (no teacher weights loaded)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.weights import parse_weights
from pipeline.errors import PipelineError
from pipeline.formats.source import open_face_source
from pipeline.losses.config import KDConfig
from pipeline.models import BackboneShape
from pipeline.training.config import TrainConfig
from pipeline.training.sampling.config import SamplerConfig
from pipeline.training.student import STUDENT_DEFAULTS
from pipeline.training.student import train_student as run_student
from stages import options
from stages.train_teacher import Data, print_summary, run_config


def train_student(
    data: Data,
    name: Annotated[str, typer.Option("--name", help="Student name; the run folder defaults to data/students/NAME.")],
    cache: Annotated[Optional[list[Path]], typer.Option(
        "--cache", help="Teacher cache from extract-teacher (needed unless --kd none). Repeat it to distil from an "
                        "ensemble of caches of the same training set, scored by their mean cosine (build-pools on "
                        "the same --cache list); feature terms then compare through a learned map to the "
                        "ensemble's size, used only in training.")] = None,
    cache_weights: Annotated[Optional[str], typer.Option(
        "--cache-weights", help="Ensemble member weights, one per --cache, e.g. 1,2 (finite, > 0; default equal): "
                                "the ensemble's similarity is the weighted mean of the members' cosines.")] = None,
    pools: Annotated[Optional[Path], typer.Option("--pools", help="Folder with pools.h5 and thresholds.json from build-pools.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder (default data/students/NAME).")] = None,
    *,
    kd: KDConfig,
    sampling: SamplerConfig,
    train_cfg: TrainConfig,
    shape: BackboneShape,
):
    """Train a student on the cached teacher targets (one cache for every student). Without KD or sampler options
    it trains the measured recipe (README, "Distillation quality"); --kd picks any method or combination."""
    check_name(name)
    out = out or Path("data/students") / name
    source = open_face_source(data)
    cfg = run_config(train_cfg, shape, out, source)
    caches = list(cache or [])
    summary = run_student(cfg, source, kd, sampling, cache=caches, pools=pools,
                          cache_weights=parse_weights(cache_weights, len(caches)))
    print_summary(out, summary)


def check_name(name: str) -> None:
    """A student name is one folder under data/students: '', '.', '..' or a separator would write elsewhere."""
    if name.strip() in ("", ".", "..") or any(c in name for c in "/\\\0") or name != name.strip():
        raise PipelineError(f"--name {name!r}: a student name must be a single folder name (no '/', '\\', "
                            "'..', surrounding spaces or empty)")


COMMANDS = {
    "train-student": options.command(train_student, defaults=STUDENT_DEFAULTS, kd=KDConfig,
                                     sampling=SamplerConfig, train_cfg=TrainConfig, shape=BackboneShape),
}
