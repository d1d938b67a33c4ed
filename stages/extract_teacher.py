"""`pipeline extract-teacher`: run the teacher once over the training set into a resumable HDF5 cache;
`pipeline cache-info`: what a cache holds; `pipeline convert-cache`: make an older, chunked cache
memory-mappable."""
from __future__ import annotations

import json
import math
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


def strict_json(value) -> str:
    """`value` as valid JSON: a non-finite number (a cache of NaN/inf values) is null, not NaN/Infinity."""

    def finite(item):
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: finite(v) for key, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [finite(v) for v in item]
        return item

    return json.dumps(finite(value), indent=2, allow_nan=False, default=_plain)


def _plain(item):
    """numpy scalars and arrays as Python values (then checked like the others)."""
    import numpy as np

    if isinstance(item, np.generic):
        value = item.item()
        return None if isinstance(value, float) and not math.isfinite(value) else value
    if isinstance(item, np.ndarray):
        return [_plain(v) for v in item]
    raise TypeError(f"{type(item).__name__} is not JSON")


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
        print(strict_json({"path": str(path), "complete": False, **progress}))
        raise PipelineError(f"{path}: extraction interrupted after {progress['shards_finished']}/"
                            f"{progress['shards_planned']} shards; rerun `pipeline extract-teacher` to finish it")
    try:
        print(strict_json(cache.summary()))
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
