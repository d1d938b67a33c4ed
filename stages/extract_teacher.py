"""`pipeline extract-teacher`: run the teacher once over the training set into a resumable HDF5 cache;
`pipeline cache-info`: what a cache holds; `pipeline convert-cache`: make an older, chunked cache
memory-mappable."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cache.build import ClusterConfig, ExtractionConfig, build_teacher_cache, shard_progress
from pipeline.cache.convert import convert_cache
from pipeline.cache.format import TeacherCache
from pipeline.errors import PipelineError
from stages import options


def extract_teacher(cfg: ExtractionConfig, cluster: ClusterConfig) -> None:
    """Embed every training image and its horizontal flip with the teacher, once, into an HDF5 cache."""
    if cluster.in_process:
        build_teacher_cache(cfg)
        return
    client = cluster.client()
    try:
        build_teacher_cache(cfg, client=client)
    finally:
        client.close()


def cache_info_command(
    path: Path = typer.Argument(..., help="A teacher cache written by extract-teacher."),
    recheck: Annotated[bool, typer.Option("--recheck", help="Read the whole file against its checksums even if "
                                          "this version of it was verified before.")] = False,
) -> None:
    """Print a teacher cache's shape, provenance and embedding-norm statistics as JSON (or the progress of an
    interrupted extraction); its checksums are verified first."""
    try:
        cache = TeacherCache.open(path, recheck=recheck)
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


def convert_cache_command(
    path: Path = typer.Argument(..., help="A teacher cache whose embeddings are chunked or compressed."),
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the converted cache here instead of "
                                                "replacing PATH (atomically).")] = None,
) -> None:
    """Rewrite a teacher cache's embeddings contiguous and uncompressed (values, labels, keys and attributes
    unchanged; no teacher is run), so that every training process on a machine shares one memory-mapped copy
    instead of reading its own into RAM."""
    convert_cache(path, out)


COMMANDS = {
    "extract-teacher": options.command(extract_teacher, cfg=ExtractionConfig, cluster=ClusterConfig),
    "cache-info": cache_info_command,
    "convert-cache": convert_cache_command,
}
