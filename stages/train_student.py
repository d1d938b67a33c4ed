"""`pipeline train-student`: a student trained on the cached teacher targets (no teacher weights loaded)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cache.format import TeacherCache
from pipeline.errors import PipelineError
from pipeline.formats import open_face_source
from pipeline.losses.kd import build_kd_loss
from pipeline.search.pools import load_pools, load_thresholds
from pipeline.training.samplers import BalancedBatchSampler
from pipeline.training.loop import Distillation, train
from stages import training_options as opt

KD_CHOICES = ("none", "l2", "cosine", "rkd", "ekd")
SAMPLERS = ("random", "balanced", "pool")


def train_student(
    data: opt.Data,
    name: Annotated[str, typer.Option("--name", help="Student name; the run folder defaults to data/students/NAME.")],
    cache: Annotated[Optional[Path], typer.Option("--cache", help="Teacher cache from extract-teacher (needed unless --kd none).")] = None,
    pools: Annotated[Optional[Path], typer.Option("--pools", help="Folder with pools.h5 and thresholds.json from build-pools.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder (default data/students/NAME).")] = None,
    kd: Annotated[str, typer.Option("--kd", help="KD loss: none, l2, cosine, rkd or ekd.")] = "ekd",
    kd_weight: Annotated[float, typer.Option("--kd-weight", help="Multiplier of the KD loss.")] = 1.0,
    ekd_mode: Annotated[str, typer.Option("--ekd-mode", help="global (exact teacher thresholds, student queue) or reference (official TFace behaviour).")] = "global",
    queue_size: Annotated[int, typer.Option("--queue-size", help="EKD global mode: recent student embeddings kept for the student's thresholds.")] = 65536,
    sampler: Annotated[str, typer.Option("--sampler", help="random (plain batches), balanced (official general+balanced batch) or pool (balanced part from neighbouring identities).")] = "pool",
    balanced_batch_size: Annotated[int, typer.Option("--balanced-batch-size", help="Balanced part of each batch (identities x --per-identity); --batch-size is the general part.")] = 64,
    per_identity: Annotated[int, typer.Option("--per-identity", help="Images per identity in the balanced part.")] = 4,
    margin_on: Annotated[str, typer.Option("--margin-on", help="Margin loss on 'all' samples or only the 'general' part (official EKD).")] = "all",
    **options,
):
    """Train a student against the teacher cache with EKD (or a KD baseline), reusing one cache for all."""
    _check_choice("--kd", kd, KD_CHOICES)
    _check_choice("--sampler", sampler, SAMPLERS)
    _check_choice("--margin-on", margin_on, ("all", "general"))
    out = out or Path("data/students") / name
    source = open_face_source(data)
    cfg = opt.make_config(out, source, options)
    batch_size, seed = options["batch_size"], options["seed"]

    distill = None
    if kd != "none":
        if cache is None:
            raise PipelineError(f"--kd {kd} needs --cache (the teacher cache from extract-teacher)")
        distill = _distillation(kd, kd_weight, ekd_mode, queue_size, cache, pools, source, cfg.arch_kwargs["num_features"])
        if margin_on == "general" and sampler != "random":
            distill.margin_samples = batch_size
    if sampler == "pool" and pools is None:
        raise PipelineError("--sampler pool needs --pools (the folder written by build-pools)")
    tables = _checked_pools(pools, source, cache) if pools is not None else None
    neighbours = tables["neighbours"] if sampler == "pool" else None

    def batches(world: int, rank: int):
        if sampler == "random":
            return None
        return BalancedBatchSampler(
            source.labels, batch_size, balanced_batch_size, per_identity=per_identity, seed=seed,
            neighbours=neighbours, world_size=world, rank=rank,
        )

    summary = train(cfg, source, source.num_classes, distill=distill,
                    batch_sampler_factory=None if sampler == "random" else batches)
    opt.print_summary(out, summary)


def _check_choice(flag: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise PipelineError(f"{flag} {value!r}: choose one of {', '.join(choices)}")


def _checked_pools(pools: Path, source, cache: Path | None) -> dict:
    """pools.h5, refused (fingerprints named) unless built from this dataset and, given --cache, its teacher:
    thresholds.json is written with it, so this also vouches for the thresholds."""
    path = pools / "pools.h5"
    tables = load_pools(path)
    wanted = {"dataset": source.fingerprint()}
    if cache is not None:
        wanted["teacher"] = TeacherCache.open(cache).teacher_fingerprint
    problems = [f"{what} {tables['attrs'].get(f'{what}_fingerprint')} (pools) != {fp} (this run)"
                for what, fp in wanted.items() if tables["attrs"].get(f"{what}_fingerprint") != fp]
    if problems:
        raise PipelineError(f"{path}: pools come from another teacher cache: {'; '.join(problems)}; "
                            "rerun `pipeline build-pools` on this run's cache")
    return tables


def _distillation(kd, kd_weight, ekd_mode, queue_size, cache_path, pools, source, dim) -> Distillation:
    """Open the cache (checked against the training data) and build the KD loss on its targets."""
    cache = TeacherCache.open(cache_path)
    cache.check_compatible(cache.teacher_fingerprint, source.fingerprint())
    if cache.dim != dim:
        raise PipelineError(f"{cache_path}: teacher embeddings are {cache.dim}-d but the student's are {dim}-d "
                            "(set --embedding-size to match)")
    kwargs = {}
    if kd == "ekd":
        kwargs["mode"] = ekd_mode
        if ekd_mode == "global":
            if pools is None:
                raise PipelineError("--ekd-mode global needs --pools (thresholds.json from build-pools)")
            kwargs.update(teacher_thresholds=load_thresholds(pools / "thresholds.json"), queue_size=queue_size)
    targets = cache.to_torch()  # (N, 2, D) in the stored dtype, looked up per step by index and flip
    return Distillation(loss=build_kd_loss(kd, **kwargs), targets=targets, weight=kd_weight)


COMMANDS = {
    "train-student": opt.with_training_options(train_student, arch="mbf", batch_size=64),
}
