"""`imagefolder` and `imagenet`: SRC/<split>/<class>/<image> (torchvision ImageFolder layout).

Decisions:
- Splits: the subfolders of SRC named train, val, valid, validation or test; when SRC has
  none of those, every non-hidden subfolder.  Of these, a folder with class folders is a
  labeled split; a `test` folder holding images directly (ImageNet's flat test set) is an
  unlabeled split; a flat `train`/`val` folder is an error (ImageNet's raw val must first
  be sorted into class folders, e.g. valprep.sh; indexing it unlabeled would be wrong).
  Other folders (devkits, ...) are not splits and are named in `warnings()`.  Order:
  train, val, test, then the rest alphabetically.
- Classes: the sorted class-folder names of `train` (of the first split when there is no
  `train`), as torchvision's ImageFolder does.  Another split with a class folder that is
  not in that list is an error, because its indices would not match the training labels.
- Files: searched recursively below each class folder (as ImageFolder does), sorted by
  relative path; a split's order is class index, then path.  Only the extensions in
  `IMAGE_EXTENSIONS` (case-insensitive) are inputs; other files and hidden files are not
  inputs and their count is reported in `warnings()`.
- `source` is the path relative to SRC; data is the raw file bytes.
"""
from __future__ import annotations

import os

from .base import RawSample, Source, SourceError, is_image_name, make_key, read_bytes, require_dir

_ORDER = {"train": 0, "val": 1, "test": 2}
_STANDARD = ("train", "val", "valid", "validation", "test")


def _subdirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _has_images(path: str) -> bool:
    return any(e.is_file() and is_image_name(e.name) for e in os.scandir(path))


class ImageFolderSource(Source):
    name = "imagefolder"

    def __init__(self, src: str):
        self.src = require_dir(src, self.name)
        self._splits: dict[str, list[str] | None] = {}  # split -> class folders (None: flat)
        dirs = _subdirs(self.src)
        standard = [d for d in dirs if d in _STANDARD]
        for d in dirs:
            if standard and d not in _STANDARD:
                self._warn(f"{os.path.join(self.src, d)}: not a split name; ignored")
        for d in sorted(standard or dirs, key=lambda n: (_ORDER.get(n, 3), n)):
            full = os.path.join(self.src, d)
            cls = _subdirs(full)
            if cls:
                self._splits[d] = cls
            elif d == "test" and _has_images(full):
                self._splits[d] = None
            elif d in ("train", "val") and _has_images(full):
                raise SourceError(f"{self.name}: {full} holds images directly, not class folders"
                                  " (sort ImageNet's val into class folders first, e.g. valprep.sh)")
            else:
                self._warn(f"{full}: not a split (no class folders); ignored")
        if not self._splits:
            raise SourceError(f"{self.name}: no split folders in {self.src}"
                              " (expected SRC/train/<class>/<image>)")
        labeled = [s for s, c in self._splits.items() if c is not None]
        if not labeled:
            self._classes: list[str] = []
        else:
            ref = "train" if "train" in labeled else labeled[0]
            self._classes = list(self._splits[ref])
            known = set(self._classes)
            for s in labeled:
                extra = [c for c in self._splits[s] if c not in known]
                if extra:
                    raise SourceError(f"{self.name}: {os.path.join(self.src, s, extra[0])} is a class"
                                      f" folder that {ref}/ does not have ({len(extra)} such)")
        self._index = {c: i for i, c in enumerate(self._classes)}

    def splits(self) -> list[str]:
        return list(self._splits)

    def classes(self) -> list[str]:
        return list(self._classes)

    def _list(self, split: str):
        """(relpath, label) in key order."""
        folders = self._splits[split]
        skipped = []
        if folders is None:
            groups = [(os.path.join(self.src, split), None)]
        else:
            groups = [(os.path.join(self.src, split, c), self._index[c]) for c in folders]
        for root, label in groups:
            found = []
            for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
                if folders is None:
                    dirnames[:] = []  # a flat split has no nested images
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                # relpath once per folder, not per file: ImageNet has 1.3 M files
                prefix = os.path.relpath(dirpath, self.src).replace(os.sep, "/") + "/"
                for fn in filenames:
                    rel = prefix + fn
                    if is_image_name(fn) and not fn.startswith("."):
                        found.append(rel)
                    else:
                        skipped.append(rel)
            for rel in sorted(found):
                yield rel, label
        if skipped:
            self._warn(f"{split}: {len(skipped)} non-image files are not inputs"
                       f" (e.g. {skipped[0]})")

    def read_entry(self, split, ordinal, item) -> RawSample:
        rel, label = item
        data, err = read_bytes(os.path.join(self.src, rel))
        name = None if label is None else self._classes[label]
        return RawSample(make_key(ordinal), rel, label, name, data, err)


class ImageNetSource(ImageFolderSource):
    """ImageNet-1k after the usual preparation (train/ and val/ in wnid class folders)."""
    name = "imagenet"

    def __init__(self, src: str):
        super().__init__(src)
        if "train" not in self._splits:
            raise SourceError(f"imagenet: no train/ class folders in {self.src}")
