"""The teacher-embedding cache: its HDF5 contract and reader (format), the memory-mapped embeddings shared by
every process (mapped) and the rewrite of chunked caches into that layout (convert), resumable shards
(shards), the extraction of one shard (worker), the whole build (build) and the optional Dask cluster
(dask_cluster).

Deliberately empty: import from the defining module (`from pipeline.cache.format import TeacherCache`), so a
module that needs one piece does not import (and, in dvc.yaml, depend on) the whole package."""
