"""`pipeline convert-cache`: rewrite a cache whose embeddings are chunked or compressed into the layout
extract-teacher writes (contiguous, uncompressed), so that training processes can memory-map it.

The stored values, labels, keys and attributes are copied unchanged (no teacher is run); the new file is
written under a temporary name with `complete` last and renamed into place, then reopened and mapped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.cache.contract import CONTRACT_ATTRS, READ_ROWS
from pipeline.cache.format import TeacherCache
from pipeline.cache.shards import write_cache


def convert_cache(path: Path, out: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Make `out` (default: `path` itself) a memory-mappable copy of the cache at `path`; returns a summary."""
    path = Path(path)
    out = path if out is None else Path(out)
    cache = TeacherCache.open(path)
    if cache.shareable and out == path:
        log(f"{path}: embeddings are already contiguous (memory-mapped at offset {cache.layout.offset}); "
            "nothing to do")
        return {"status": "up-to-date", "rows": len(cache)}
    before = cache.layout.reason or "contiguous"

    def parts():
        for start in range(0, len(cache), READ_ROWS):
            stop = min(start + READ_ROWS, len(cache))
            yield start, cache.stored_rows(start, stop), cache.labels[start:stop], cache.keys[start:stop]

    try:
        write_cache(out, {name: cache.attrs[name] for name in CONTRACT_ATTRS}, parts())
    finally:
        cache.close()
    converted = TeacherCache.open(out)
    converted.mapped()  # checked against HDF5 on sample rows
    log(f"{out}: wrote the teacher cache with contiguous embeddings ({len(converted)} rows; was {before}); "
        "training processes now share one memory-mapped copy")
    return {"status": "converted", "rows": len(converted), "offset": converted.layout.offset}
