"""The on-disk contract shared by dynaprep (writer) and dynatrain (reader): docs/FORMAT.md."""
from .io import (  # noqa: F401 (the package API)
    atomic_path,
    iter_tar_samples,
    npy_bytes,
    npy_load,
    read_dataset_info,
    read_manifest,
    read_shards,
    resolve,
    sha256_file,
    write_bytes_atomic,
    write_dataset_info,
    write_json_atomic,
    write_manifest,
    write_shards,
)
from .schema import (
    FORMAT_VERSION,
    MANIFEST_SCHEMA,
    DEFAULT_SCORER,
    SCORER_NAMES,
    SHARDS_SCHEMA,
    DatasetInfo,
    FormatError,
    KInfo,
    SplitCounts,
    image_shard_name,
    index_dtype_name,
    index_shard_name,
    k_count,
    seq_len,
    key_for,
    k_ext,
)
from .shards import IndexShard, ShardPairWriter, check_indices, read_npy, scan_image_shard
from .tar import TarError, TarWriter, group_by_keys, scan_members, split_name
from .validate import Violation, validate_dataset

__version__ = "0.1.0"
