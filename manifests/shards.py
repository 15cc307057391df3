"""Writing one shard pair: an image shard plus one index shard per scorer, same keys, same order."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import TarWriter, npy_bytes, sha256_file
from .schema import image_shard_name, index_dtype_name, index_shard_name


class ShardPairWriter:
    """Write the tars of one work unit and return its `shards.parquet` row on commit.

    With `external_images` (the user's own WebDataset) no image shard is written: the row
    points at the user's tar, and only the index shards are ours.
    """

    def __init__(self, out_dir, split: str, shard: int, scorers, ks, num_patches: int,
                 image_ext: str = "jpg", external_images: str | None = None):
        self.out_dir, self.split, self.shard = Path(out_dir), split, shard
        self.scorers, self.ks, self.image_ext = list(scorers), list(ks), image_ext
        self.dtype = np.dtype(index_dtype_name(num_patches))
        self.external_images = external_images
        self.images_rel = external_images or image_shard_name(split, shard)
        self._images = None if external_images else TarWriter(self.out_dir / self.images_rel)
        self.index_rel = {s: index_shard_name(split, s, shard) for s in self.scorers}
        self._index = {s: TarWriter(self.out_dir / rel) for s, rel in self.index_rel.items()}
        self.count = 0

    def add(self, key: str, image: bytes | None, label: int | None,
            scores: dict[str, np.ndarray], indices: dict[str, dict[int, np.ndarray]]) -> None:
        if self._images is not None:
            members = {self.image_ext: image}
            if label is not None:
                members["cls"] = str(int(label)).encode()
            self._images.write(key, members)
        for scorer, writer in self._index.items():
            members = {"scores.npy": npy_bytes(np.asarray(scores[scorer], dtype=np.float16))}
            for k in self.ks:
                members[f"k{k}.npy"] = npy_bytes(np.asarray(indices[scorer][k], dtype=self.dtype))
            writer.write(key, members)
        self.count += 1

    def commit(self) -> dict:
        """Close every tar (index shards first, images last) and describe them."""
        for writer in self._index.values():
            writer.close()
        if self._images is not None:
            self._images.close()
        images_path = Path(self.images_rel) if self.external_images else self.out_dir / self.images_rel
        digest, size = sha256_file(images_path)
        index = []
        for scorer, rel in self.index_rel.items():
            d, s = sha256_file(self.out_dir / rel)
            index.append({"scorer": scorer, "path": rel, "bytes": s, "sha256": d})
        return {"split": self.split, "shard": self.shard, "images": self.images_rel, "images_bytes": size,
                "images_sha256": digest, "index": index, "count": self.count}

    def abort(self) -> None:
        for writer in [*self._index.values(), *([self._images] if self._images else [])]:
            writer.close(ok=False)
