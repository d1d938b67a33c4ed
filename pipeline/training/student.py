"""A student run: the teacher cache and pools checked against the training data and each other, the KD loss
on the cached targets (no teacher weights are loaded), the batch sampler, then the one training loop.

Everything that changes the result beyond `TrainConfig` (the KD method and its knobs, the sampler, the
cache and pools fingerprints) is handed to `train` as the run's settings: part of the resume identity and
recorded in model.pt."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pipeline.cache.ensemble import TeacherEnsemble
from pipeline.errors import PipelineError
from pipeline.storage.io import refuse_mismatch
from pipeline.losses.base import Need
from pipeline.losses.config import KDConfig
from pipeline.search.pool_files import check_pair, load_pools, pools_fingerprint
from pipeline.training.config import TrainConfig
from pipeline.training.distill import Distillation, KDTerm
from pipeline.training.targets import CachedTargets, EnsembleTargets, StudentProjection
from pipeline.training.loop import train
from pipeline.settings import identity as settings_identity
from pipeline.training.sampling.config import SamplerConfig


def checked_pools(pools: Path, source, cache: TeacherEnsemble | None) -> dict:
    """pools.h5, refused (fingerprints named) unless built from this dataset and, given a cache, from that
    very cache; its thresholds.json must be the one written with it (`tables["thresholds"]`)."""
    path = pools / "pools.h5"
    tables = load_pools(path)
    expected = {"dataset_fingerprint": source.fingerprint()}
    if cache is not None:
        expected.update(teacher_fingerprint=cache.teacher_fingerprint, cache_fingerprint=cache.fingerprint)
    refuse_mismatch(path, tables["attrs"], expected, "pools come from another teacher cache",
                    "rerun `pipeline build-pools` on this run's cache")
    tables["thresholds"] = check_pair(tables, path, pools / "thresholds.json")
    return tables


def open_targets(caches: Sequence[Path], source, weights: Sequence[float] | None = None) -> TeacherEnsemble:
    """The teacher cache, or an ensemble of caches, each checked against the training data (fingerprints,
    then row by row: keys and labels); the members against each other by `TeacherEnsemble`."""
    targets = TeacherEnsemble.open(caches, weights)
    for member in targets.members:
        member.check_compatible(member.teacher_fingerprint, source.fingerprint())
        member.check_rows(source.labels, source.keys, "the training data")
    return targets


def target_lookup(targets: TeacherEnsemble):
    """What a step reads: one cache's (N, 2, D) table in the stored dtype, or the members' tables read as one
    teacher; looked up per step by sample index and flip. Memory-mapped, so all ranks and DataLoader workers
    of a machine share one copy (chunked caches: a RAM copy each)."""
    tables = [member.to_torch(shared=True) for member in targets.members]
    return CachedTargets(tables[0]) if targets.single else EnsembleTargets(tables, targets.shares)


def projection_for(kd: KDConfig, targets: TeacherEnsemble, student_dim: int) -> StudentProjection | None:
    """The learned map to the teacher's size when a same_dim term needs one (training/targets.py); a class-centre
    method, whose centres live in the student's embedding space, is refused for a teacher of another size."""
    if targets.dim == student_dim:
        return None
    teacher = f"{targets.path}: the teacher's embeddings are {targets.dim}-d, the student's {student_dim}-d"
    heads = [m.name for m in kd.methods if m.in_head]
    if heads:
        raise PipelineError(f"{teacher}; --kd {heads[0]} moves the student's class centres toward the teacher's "
                            "embeddings and needs equal sizes (set --embedding-size, or use ekd, l2, rkd)")
    return StudentProjection(student_dim, targets.dim) if any(m.same_dim for m in kd.methods) else None


# train-student's own defaults where they differ from TrainConfig's (which are the teacher's): the compact
# student of the field, MobileFaceNet, with the official EKD batch (64 general + 64 balanced).
STUDENT_DEFAULTS = {"arch": "mbf", "batch_size": 64}


def stage2_outputs(needs: set[str], tables: dict | None) -> dict:
    """What the distillation methods declared they need from build-pools (base.Need values)."""
    if not needs:
        return {}
    return {Need.thresholds.value: tables["thresholds"], Need.centres.value: tables["centres"],
            Need.hard_pairs.value: tables["neg_pairs"]}


def train_student(cfg: TrainConfig, source, kd: KDConfig, sampling: SamplerConfig,
                  cache: Path | Sequence[Path] | None = None, pools: Path | None = None,
                  cache_weights: Sequence[float] | None = None) -> dict:
    """Train `cfg` on `source` against the teacher cache (or an ensemble: several cache paths, optional
    `cache_weights`) with `kd`; returns `train`'s summary."""
    distill, targets = None, None
    caches = [cache] if isinstance(cache, (str, Path)) else list(cache or [])
    if kd.enabled:
        if not caches:
            raise PipelineError(f"--kd {kd.kd} needs --cache (the teacher cache from extract-teacher)")
        targets = open_targets(caches, source, cache_weights)
    needs_pools = bool(kd.needs()) or sampling.needs_pools
    if needs_pools and pools is None:
        what = f"--kd {kd.kd}" if kd.needs() else f"--sampler {sampling.sampler}"
        raise PipelineError(f"{what} needs --pools (the folder written by build-pools)")
    tables = checked_pools(pools, source, targets) if pools is not None else None
    settings = {**kd.identity(), **settings_identity(sampling)}
    if targets is not None:
        settings["cache"] = targets.fingerprint  # an ensemble's: every member cache and its weight
        stage2 = stage2_outputs(kd.needs(), tables)
        terms = [KDTerm(name, loss, weight) for name, loss, weight in kd.terms(stage2)]
        distill = Distillation(targets=target_lookup(targets), terms=terms, scale=kd.kd_scale,
                               warmup_epochs=kd.kd_warmup_epochs, head=kd.head_method(stage2),
                               projection=projection_for(kd, targets, cfg.arch_kwargs["num_features"]))
    if needs_pools:
        settings["pools"] = pools_fingerprint(tables)
    factory = sampling.factory(source.labels, cfg.batch_size, cfg.seed, tables)
    return train(cfg, source, source.num_classes, distill=distill, batch_sampler_factory=factory,
                 margin_samples=sampling.margin_samples(cfg.batch_size), settings=settings)
