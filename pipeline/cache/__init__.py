"""The teacher-embedding cache: its HDF5 contract and reader (format), the memory-mapped embeddings shared by
every process (mapped) and the rewrite of chunked caches into that layout (convert), resumable shards
(shards), the extraction of one shard (worker), the whole build (build) and the optional Dask cluster
(dask_cluster)."""
from pipeline.cache.build import (
    ClusterConfig,
    ExtractionConfig,
    build_teacher_cache,
    shard_progress,
)
from pipeline.cache.convert import convert_cache
from pipeline.cache.format import TeacherCache

__all__ = ["ClusterConfig", "ExtractionConfig", "TeacherCache", "build_teacher_cache", "convert_cache",
           "shard_progress"]
