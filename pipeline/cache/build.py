"""Build the teacher cache: check what exists, run the missing shards (in-process or on Dask), assemble.

A rerun on a complete, matching cache is a no-op; after a crash it keeps every finished shard, redoes the
rest, and produces the same bytes as an uninterrupted run. A cache or shard folder from another teacher,
dataset, dim, dtype, shard size or thread count is refused (both fingerprints printed) unless
`overwrite=True`. One extraction writes a cache at a time (`output_lock`).

What is guaranteed about the bytes: on CPU, with the same torch build, CPU instruction set and `threads`,
the cache is byte-identical whatever the worker layout (in this process, any number of Dask workers,
interrupted and resumed in either): shards are fixed row ranges, batches fixed within a shard, and every
forward runs with `threads` intra-op threads. Another `threads`, another CPU or a GPU (cuDNN's algorithm
choice, fp16 autocast) gives values that agree to rounding, not the same bytes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from pipeline.cache.contract import FORMAT_VERSION, CacheDtype, contract_attrs
from pipeline.cache.format import TeacherCache
from pipeline.cache.mapped import convert_hint
from pipeline.cache.shards import (
    SHARD_META,
    Shard,
    assemble,
    plan_shards,
    read_manifest,
    remove_shard_dir,
    remove_temporaries,
    shard_dir,
    shard_is_valid,
    write_manifest,
)
from pipeline.cache.worker import (
    ShardJob,
    default_decode_threads,
    default_forward_threads,
    prepare_teacher,
    run_shard,
)
from pipeline.machine.devices import device_setting, resolve_device
from pipeline.errors import DataError, PipelineError
from pipeline.formats.source import open_face_source
from pipeline.progress import progress_bar
from pipeline.storage.io import output_lock, refuse_mismatch, refuse_symlink
from pipeline.models import Arch
from pipeline.models.loading import file_sha256, load_embedder
from pipeline.models.preprocess import preprocessing_attrs
from pipeline.machine.resources import processes_bound, threads_bound
from pipeline.settings import check, identity, setting

FLIP = "horizontal"
# Settings a user changes on purpose (e.g. --dtype float32, as a float16 overflow advises): shards made with
# another value cannot be part of this cache, so they are discarded (a rerun just works) instead of refused;
# another teacher or dataset is still refused (a mistyped path must not cost hours of finished shards)
REDONE_ON_CHANGE = ("dtype", "shard_size")


@dataclass
class ExtractionConfig:
    """The knobs of `pipeline extract-teacher`."""

    # the data and the teacher enter a run's identity by their fingerprints, not their paths
    data: Path = setting(help="Training set: folder with train.rec/.idx/property (or images).", identity=False)
    teacher: Path = setting(help="Teacher weights (.pt/.pth, checkpoint, TorchScript, ONNX).", identity=False)
    out: Path = setting(help="The HDF5 cache to write.", identity=False)
    arch: Optional[str] = setting(None, "Teacher architecture if it cannot be inferred.", choices=Arch)
    batch_size: int = setting(256, "Images per forward (each is run with its flip).", min=1)
    shard_size: int = setting(16384, "Rows per resumable shard file.", min=1)
    dtype: str = setting("float16", "Stored embedding type: float16 or float32.", choices=CacheDtype)
    device: str = device_setting()
    decode_threads: int = setting(0, "JPEG decode threads per process (0 = sized to the machine).", min=0,
                                  validate=threads_bound, cli=False, identity=False)
    threads: int = setting(0, "Torch threads of each teacher forward on CPU, in this process and in every Dask "
                              "worker: the cache's bytes depend on it, not on --workers (0 = min(4, CPU cores)).",
                           min=0, validate=threads_bound)
    input_size: Optional[int] = setting(None, "Input size of a TorchScript/ONNX teacher that does not declare it "
                                              "(default: the data's image size).", min=16)
    overwrite: bool = setting(False, "Rebuild even if a cache from another teacher/dataset exists.",
                              identity=False)

    def __post_init__(self):
        self.data, self.teacher, self.out = Path(self.data), Path(self.teacher), Path(self.out)
        check(self)


@dataclass
class ClusterConfig:
    """Where extraction runs: in this process, on a local Dask cluster, or on an existing scheduler."""

    workers: int = setting(0, "Dask workers: 0 = in this process, -1 = one per GPU (CPU-sized without GPUs).",
                           min=-1, validate=processes_bound, identity=False)
    scheduler: Optional[str] = setting(None, "Use an existing Dask cluster, e.g. tcp://host:8786.", identity=False)

    def __post_init__(self):
        check(self)

    @property
    def in_process(self) -> bool:
        return self.workers == 0 and not self.scheduler

    def client(self):
        """A Dask client of the configured cluster (close it to shut a local cluster down)."""
        from pipeline.cache.dask_cluster import (
            make_client,  # dask.distributed only when it is used
        )

        return make_client(scheduler=self.scheduler, n_workers=self.workers if self.workers > 0 else None)


def _manifest(cfg: ExtractionConfig, teacher, dataset_fp: str, rows: int) -> dict:
    """What the shards of a run depend on: every identity setting of `cfg` (declared in ExtractionConfig, so
    none can be forgotten here) plus the teacher's and the data's fingerprints. The device is recorded as the
    kind it resolves to (`auto` on a CPU machine is `cpu`; cuda:0 and cuda:1 are both `cuda`)."""
    return {
        **identity(cfg),
        "device": resolve_device(cfg.device).type,
        "format_version": FORMAT_VERSION,
        "teacher_fingerprint": teacher.fingerprint,
        "dataset_fingerprint": dataset_fp,
        "dim": int(teacher.dim),
        "rows": int(rows),
    }


def _refuse_mismatch(where: Path, found: dict, wanted: dict) -> None:
    """PipelineError describing every difference between an existing cache/shard folder and this run."""
    always = ("dim", "teacher_fingerprint", "dataset_fingerprint")  # compared even when `found` lacks them
    expected = {name: value for name, value in wanted.items() if name in always or name in found}
    refuse_mismatch(where, found, expected, "refusing to reuse it", "rerun with --overwrite")


def _existing_cache_is_current(cfg: ExtractionConfig, wanted: dict, log: Callable[[str], None]) -> bool:
    """True if `out` already holds this exact cache; refuses a mismatched complete cache (unless overwrite).

    Decided from fingerprints alone, before any teacher is loaded, so that a no-op rerun takes seconds.
    """
    if not cfg.out.exists() or cfg.overwrite:
        return False
    try:
        cache = TeacherCache.open(cfg.out)
    except PipelineError as error:
        log(f"{cfg.out}: not a usable cache ({error}); rebuilding it")
        return False
    _refuse_mismatch(cfg.out, cache.attrs, wanted)
    if not cache.shareable:
        log(f"{cfg.out}: embeddings are {cache.layout.reason}; {convert_hint(cfg.out)}")
    return True


def _reusable_shards(cfg: ExtractionConfig, folder: Path, manifest: dict, log) -> list[Shard]:
    """Prepare the shard folder; return the planned shards that are already finished and valid."""
    refuse_symlink(folder, "shards")
    existing = read_manifest(folder)
    if existing is not None and not cfg.overwrite:
        _refuse_mismatch(folder, {k: v for k, v in existing.items() if k not in REDONE_ON_CHANGE}, manifest)
        changed = [f"{name} {existing.get(name)} (now {manifest[name]})" for name in REDONE_ON_CHANGE
                   if existing.get(name) != manifest[name]]
        if changed:
            log(f"{folder}: discarding the shards of an earlier run with {', '.join(changed)}")
            existing = None
    if existing is None or cfg.overwrite:
        remove_shard_dir(folder)
    write_manifest(folder, manifest)
    stale = remove_temporaries(folder)
    if stale:
        log(f"{folder}: removed {stale} half-written shard file(s) from an interrupted run")
    shards = plan_shards(folder, manifest["rows"], cfg.shard_size)
    done = [s for s in shards if s.path.exists() and shard_is_valid(s, manifest)]
    for shard in shards:
        if shard not in done and shard.path.exists():
            log(f"{shard.path}: invalid or partial shard, redoing it")
            shard.path.unlink()
    return done


def _check_config(cfg: ExtractionConfig, teacher_given: bool) -> ExtractionConfig:
    """`cfg` with its automatic values resolved; PipelineError for a missing teacher or a folder as --out."""
    if not teacher_given and not cfg.teacher.is_file():
        raise PipelineError(f"--teacher {cfg.teacher}: file not found")
    if cfg.out.is_dir():
        raise PipelineError(f"--out {cfg.out}: is a folder; name the cache file to write, e.g. "
                            f"{cfg.out / 'teacher.h5'}")
    return replace(cfg, decode_threads=cfg.decode_threads or default_decode_threads(),
                   threads=cfg.threads or default_forward_threads())


def _size_hint(cfg: ExtractionConfig, source) -> int | None:
    """--input-size, else the data's side for square images: what a TorchScript/ONNX teacher gets when its
    file does not declare its input size."""
    if cfg.input_size is not None:
        return cfg.input_size
    size = source.image_size
    return int(size[0]) if size is not None and size[0] == size[1] else None


def _load_checked_teacher(cfg: ExtractionConfig, source, on_dask: bool):
    """The teacher (on CPU when it only has to describe itself for Dask workers), its input size checked."""
    device = "cpu" if on_dask else resolve_device(cfg.device)
    teacher = prepare_teacher(load_embedder(cfg.teacher, arch=cfg.arch, device=device,
                                            size_hint=_size_hint(cfg, source)))
    _check_image_size(cfg, source, teacher)
    return teacher


def _check_image_size(cfg: ExtractionConfig, source, teacher) -> None:
    size = teacher.input_size
    if source.image_size is not None and tuple(source.image_size) != (size, size):
        raise DataError(f"{cfg.data}: images are {source.image_size[1]}x{source.image_size[0]} but teacher "
                        f"{cfg.teacher} expects {size}x{size}")


def build_teacher_cache(
    cfg: ExtractionConfig,
    client=None,
    teacher=None,
    shard_task: Callable[[ShardJob], dict] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Make `cfg.out` a complete teacher cache for `cfg.teacher` over `cfg.data`; returns a run summary.

    `client`: a Dask client to run shards on (None = in this process). `teacher`: an already loaded Embedder
    for the in-process path (else loaded from `cfg.teacher`). `shard_task`: replaces `run_shard` on Dask
    (instrumentation and fault-injection hook; it must be importable by the workers).
    """
    started = time.perf_counter()
    cfg = _check_config(cfg, teacher_given=teacher is not None)
    with output_lock(cfg.out):
        return _build(cfg, client, teacher, shard_task, log, started)


def _build(cfg: ExtractionConfig, client, teacher, shard_task, log, started: float) -> dict:
    source = open_face_source(cfg.data)
    rows, dataset_fp = len(source), source.fingerprint()
    if rows == 0:
        raise DataError(f"{cfg.data}: the dataset has no images")
    teacher_fp = teacher.fingerprint if teacher is not None else file_sha256(cfg.teacher)
    wanted = {"teacher_fingerprint": teacher_fp, "dataset_fingerprint": dataset_fp, "dtype": cfg.dtype,
              "rows": rows, "format_version": FORMAT_VERSION}
    folder = shard_dir(cfg.out)
    if _existing_cache_is_current(cfg, wanted, log):
        remove_shard_dir(folder)  # left over if a previous run was killed right after the final rename
        log(f"{cfg.out}: teacher cache is complete and up to date ({rows} images, teacher {teacher_fp[:12]}, "
            f"dataset {dataset_fp[:12]}); nothing to do")
        return {"status": "up-to-date", "rows": rows, "shards_run": 0, "seconds": time.perf_counter() - started}

    if teacher is None:
        teacher = _load_checked_teacher(cfg, source, on_dask=client is not None)
    else:
        _check_image_size(cfg, source, teacher)
    manifest = _manifest(cfg, teacher, dataset_fp, rows)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    done = _reusable_shards(cfg, folder, manifest, log)
    shards = plan_shards(folder, rows, cfg.shard_size)
    todo = [s for s in shards if s not in done]
    if done:
        log(f"{folder}: resuming, {len(done)}/{len(shards)} shards already finished")
    meta = {k: manifest[k] for k in SHARD_META}
    jobs = [ShardJob(str(cfg.data), str(cfg.teacher), cfg.arch, cfg.device, cfg.batch_size, cfg.decode_threads,
                     shard, meta, cfg.threads, _size_hint(cfg, source)) for shard in todo]
    if client is None:
        _run_in_process(jobs, teacher, source, sum(s.rows for s in done), rows)
    else:
        _run_on_dask(client, jobs, shard_task or run_shard)

    attrs = contract_attrs(
        teacher_fingerprint=teacher.fingerprint, teacher_name=teacher.name, dataset_fingerprint=dataset_fp,
        preprocessing={**preprocessing_attrs(teacher.input_size), "flip": FLIP}, rows=rows, dim=teacher.dim,
        dtype=cfg.dtype,
    )
    assemble(cfg.out, shards, attrs)
    remove_shard_dir(folder)
    seconds = time.perf_counter() - started
    log(f"{cfg.out}: wrote teacher cache, {rows} images x 2 views x {teacher.dim} ({cfg.dtype}), "
        f"{len(todo)} shard(s) run, {len(done)} reused, {seconds:.1f}s")
    return {"status": "built", "rows": rows, "shards_run": len(todo), "shards_reused": len(done), "seconds": seconds}


def shard_progress(out: Path) -> dict | None:
    """For an interrupted extraction: how many of the planned shards are finished (None if no shard folder)."""
    folder = shard_dir(Path(out))
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    shards = plan_shards(folder, manifest["rows"], manifest["shard_size"])
    finished = [s for s in shards if shard_is_valid(s, manifest)]
    return {"shard_folder": str(folder), "shards_finished": len(finished), "shards_planned": len(shards),
            "rows_finished": sum(s.rows for s in finished), "rows": manifest["rows"],
            "teacher_fingerprint": manifest["teacher_fingerprint"],
            "dataset_fingerprint": manifest["dataset_fingerprint"]}


def _run_in_process(jobs: list[ShardJob], teacher, source, already: int, rows: int) -> None:
    with progress_bar(total=rows, initial=already, desc="extract-teacher", unit="img", unit_scale=True) as bar:
        for job in jobs:
            run_shard(job, teacher=teacher, source=source, on_batch=bar.update)


def _run_catching(task: Callable[[ShardJob], dict], job: ShardJob):
    """Data errors are deterministic: report them instead of raising, so Dask does not retry them."""
    try:
        return task(job)
    except PipelineError as error:
        return {"error": str(error)}


def _run_on_dask(client, jobs: list[ShardJob], task: Callable[[ShardJob], dict]) -> None:
    from functools import partial

    from pipeline.cache.dask_cluster import run_jobs

    def stop_on_error(job: ShardJob, result: dict) -> None:
        if "error" in result:
            raise PipelineError(result["error"])

    try:
        run_jobs(client, partial(_run_catching, task), jobs, weight=lambda job: job.rows,
                 desc="extract-teacher", on_result=stop_on_error)
    except PipelineError:
        raise
    except Exception as error:  # KilledWorker, lost scheduler, repeated worker errors
        raise PipelineError(f"extract-teacher: a shard failed on the Dask cluster: {type(error).__name__}: "
                            f"{error}") from error
