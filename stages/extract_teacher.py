"""`pipeline extract-teacher`: run the teacher once over the training set into a resumable HDF5 cache;
`pipeline cache-info`: what a cache holds."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from pipeline.cache.format import TeacherCache
from pipeline.cache.build import ExtractionConfig, build_teacher_cache, shard_progress
from pipeline.errors import PipelineError


def command(
    data: Path = typer.Option(..., "--data", help="Training set: folder with train.rec/.idx/property (or images)."),
    teacher: Path = typer.Option(..., "--teacher", help="Teacher weights (.pt/.pth, checkpoint, TorchScript, ONNX)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Teacher architecture if it cannot be inferred."),
    out: Path = typer.Option(..., "--out", help="The HDF5 cache to write."),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per forward (each is run with its flip)."),
    shard_size: int = typer.Option(16384, "--shard-size", help="Rows per resumable shard file."),
    dtype: str = typer.Option("float16", "--dtype", help="Stored embedding type: float16 or float32."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    workers: int = typer.Option(0, "--workers", help="Dask workers: 0 = in this process, -1 = one per GPU/CPU-sized."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Use an existing Dask cluster, e.g. tcp://host:8786."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Rebuild even if a cache from another teacher/dataset exists."),
) -> None:
    """Embed every training image and its horizontal flip with the teacher, once, into an HDF5 cache."""
    if dtype not in ("float16", "float32"):
        raise PipelineError(f"--dtype {dtype!r}: use float16 or float32")
    cfg = ExtractionConfig(data=data, teacher=teacher, out=out, arch=arch, batch_size=batch_size,
                           shard_size=shard_size, dtype=dtype, device=device, overwrite=overwrite)
    if workers == 0 and not scheduler:
        build_teacher_cache(cfg)
        return
    from pipeline.cache.dask_cluster import make_client

    client = make_client(scheduler=scheduler, n_workers=workers if workers > 0 else None)
    try:
        build_teacher_cache(cfg, client=client)
    finally:
        client.close()


def cache_info_command(path: Path = typer.Argument(..., help="A teacher cache written by extract-teacher.")) -> None:
    """Print a teacher cache's shape, provenance and embedding-norm statistics as JSON (or the progress of an
    interrupted extraction)."""
    try:
        cache = TeacherCache.open(path)
    except PipelineError:
        progress = shard_progress(path)
        if progress is None:
            raise
        print(json.dumps({"path": str(path), "complete": False, **progress}, indent=2))
        raise PipelineError(f"{path}: extraction interrupted after {progress['shards_finished']}/"
                            f"{progress['shards_planned']} shards; rerun `pipeline extract-teacher` to finish it")
    try:
        print(json.dumps(cache.summary(), indent=2))
    finally:
        cache.close()


COMMANDS = {"extract-teacher": command, "cache-info": cache_info_command}
