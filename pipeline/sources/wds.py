"""`wds`: an existing WebDataset (e.g. img2dataset output), indexed in place.

--src is one of
- a brace pattern `path/{000000..000099}.tar` (expanded with braceexpand, in its order; every
  expanded file must exist),
- a glob `path/*.tar` (sorted),
- a single tar file,
- a directory: tars directly inside form one split `train`; otherwise each subfolder that
  holds tars is a split named after it.  Tars named `topk-*` (index shards that dynaprep
  writes) and hidden files are not inputs.
Pattern, glob and single-file inputs form one split, named by the `split` option ("train").
Tar suffixes accepted: .tar, .tar.gz, .tgz.

One work unit per input tar (shard_size is ignored); `image_shard(unit)` is its absolute path.

Samples are grouped exactly like webdataset does (tariterators.base_plus_ext + group_by_keys):
regular members only, `__*__` metadata skipped, key = member path up to the first dot of its
basename (a directory prefix stays part of the key, e.g. "part1/000123"; members without a
dot are not samples), suffix lower-cased, consecutive members with the same key form one
sample.  Keys are the user's keys verbatim, so the index shards written under the same keys
line up member for member.
- image: the first present of jpg, jpeg, png, webp, ppm; none -> failed sample (the error
  says when the basename has an extra dot, e.g. "a.b.jpg" is key "a" with suffix "b.jpg");
- label: `cls` parsed as an int (ASCII); class_name only with the `classes_file` option (one
  class name per line, line i = class i); without it classes() is [];
- source: "<tar basename>#<key>".
A key that appears twice in one tar, or a sample with two members of the same suffix, is a
failed sample (webdataset would raise).  A tar that cannot be opened or is truncated yields
what it could read plus one failed sample with key "__tar_error__" (the webdataset metadata
convention, so it cannot clash with a real key); keys cannot be checked for uniqueness
across tars here.
"""
from __future__ import annotations

import glob
import os
import tarfile

from dynavit.manifests.schema import IMAGE_EXTS
from dynavit.manifests.tar import group_by_keys

from .base import RawSample, Source, SourceError, WorkUnit

try:
    from braceexpand import braceexpand
except ImportError:  # pragma: no cover - a dependency of dynavit
    braceexpand = None

IMAGE_SUFFIXES = IMAGE_EXTS
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
TAR_ERROR_KEY = "__tar_error__"
def _is_input_tar(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES) and not name.startswith((".", "topk-"))


def _tars_in(folder: str) -> list[str]:
    return sorted(os.path.join(folder, e.name) for e in os.scandir(folder)
                  if e.is_file() and _is_input_tar(e.name))


class WdsSource(Source):
    name = "wds"
    external_images = True

    def __init__(self, src: str, split: str = "train", classes_file: str | None = None):
        if not src:
            raise SourceError("wds: --src is required (a tar, a {a..b} pattern, a glob or a folder)")
        self.src = src
        self._splits = self._resolve(src, split)
        self._classes: list[str] = []
        if classes_file:
            try:
                with open(classes_file, encoding="utf-8") as f:
                    self._classes = [ln.rstrip("\r\n") for ln in f if ln.strip()]
            except OSError as e:
                raise SourceError(f"wds: cannot read classes file {classes_file}: {e.strerror or e}") from None

    @staticmethod
    def _resolve(src: str, split: str) -> dict[str, list[str]]:
        if "{" in src:
            if braceexpand is None:  # pragma: no cover
                raise SourceError("wds: brace patterns need the braceexpand package")
            tars = [os.path.abspath(p) for p in braceexpand(src)]
            missing = [p for p in tars if not os.path.isfile(p)]
            if missing:
                raise SourceError(f"wds: {len(missing)} of {len(tars)} shards of {src} do not exist"
                                  f" (first: {missing[0]})")
            return {split: tars}
        if any(c in src for c in "*?["):
            tars = sorted(os.path.abspath(p) for p in glob.glob(src) if os.path.isfile(p))
            if not tars:
                raise SourceError(f"wds: no files match {src}")
            return {split: tars}
        if os.path.isfile(src):
            return {split: [os.path.abspath(src)]}
        if not os.path.isdir(src):
            raise SourceError(f"wds: --src {src} does not exist")
        root = os.path.abspath(src)
        direct = _tars_in(root)
        if direct:
            return {"train": direct}
        splits = {}
        for e in sorted(os.scandir(root), key=lambda e: e.name):
            if e.is_dir() and not e.name.startswith("."):
                tars = _tars_in(e.path)
                if tars:
                    splits[e.name] = tars
        if not splits:
            raise SourceError(f"wds: no .tar files in {root} or its subfolders")
        return splits

    def splits(self) -> list[str]:
        return list(self._splits)

    def classes(self) -> list[str]:
        return list(self._classes)

    def count(self, split: str) -> int | None:
        return None  # only known after reading the tars

    def units(self, split: str, shard_size: int = 0, order_seed: int | None = None) -> list[WorkUnit]:
        # The user's tars are indexed in place: one unit per tar, in the tar's own order
        # (shard_size and order_seed do not apply; the trainer's epochs are exact anyway).
        self._check_split(split)
        return [WorkUnit(split, i, path) for i, path in enumerate(self._splits[split])]

    def image_shard(self, unit: WorkUnit) -> str | None:
        return unit.payload

    def read_unit(self, unit: WorkUnit):
        path = unit.payload
        tar_name = os.path.basename(path)
        failure: list[BaseException] = []

        def members():  # (name, bytes) of every regular member, streamed (also .tar.gz)
            try:
                with tarfile.open(path, mode="r|*") as tf:
                    for info in tf:
                        if info.isreg():
                            yield info.name, tf.extractfile(info).read()
                        tf.members = []  # streaming: do not keep every TarInfo
            except (OSError, tarfile.TarError, EOFError) as e:
                failure.append(e)

        seen: set[str] = set()

        def finish(key, group, problem):
            if key in seen:
                problem = "key appears twice in this tar (non-adjacent members)"
            seen.add(key)
            return self._sample(tar_name, key, {ext: data for ext, (_, data) in group.items()}, problem)

        last = None
        for sample in group_by_keys(members()):  # webdataset's grouping rule, shared with the trainer
            if last is not None:
                yield finish(*last)
            last = sample
        if last is not None:
            key, group, problem = last
            yield finish(key, group, problem or ("tar ends inside this sample" if failure else None))
        if failure:
            # One per unreadable tar; the unit index keeps the key unique within the split.
            yield RawSample(f"{TAR_ERROR_KEY}{unit.index:06d}", f"{tar_name}#", None, None, None,
                            f"unreadable tar {path}: {failure[0]}")

    def _sample(self, tar_name: str, key: str, members: dict, err: str | None) -> RawSample:
        source = f"{tar_name}#{key}"
        label = name = None
        img = next((members[s] for s in IMAGE_SUFFIXES if s in members), None)
        if err is None and img is None:
            dotted = [s for s in members if "." in s and s.rsplit(".", 1)[1] in IMAGE_SUFFIXES]
            err = f"no image member (members: {', '.join(sorted(members)) or 'none'})"
            if dotted:
                err += f"; {key}.{dotted[0]} has a dot in its basename, so webdataset splits it" \
                       f" into key {key!r} and suffix {dotted[0]!r}"
        if err is None and "cls" in members:
            try:
                label = int(members["cls"].decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                err = f"cls is not an integer: {members['cls'][:20]!r}"
            else:
                if self._classes:
                    if 0 <= label < len(self._classes):
                        name = self._classes[label]
                    else:
                        err = f"cls {label} is outside the {len(self._classes)} classes of the classes file"
        if err is not None:
            return RawSample(key, source, None, None, None, err)
        return RawSample(key, source, label, name, img, None)
