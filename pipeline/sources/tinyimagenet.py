"""`tinyimagenet`: the tiny-imagenet-200 release.

SRC is `tiny-imagenet-200/` (or its parent) with wnids.txt, words.txt,
train/<wnid>/images/*.JPEG, val/images/*.JPEG + val/val_annotations.txt and test/images/*.JPEG.

Decisions:
- Classes are sorted(wnids.txt), the order torchvision's ImageFolder gives the train folder
  (wnids.txt itself is not sorted).
- class_name is the full words.txt gloss ("goldfish, Carassius auratus"): first names are
  not unique across ImageNet synsets (e.g. "crane"), and the full gloss loses nothing.
  A wnid missing from words.txt is named by its wnid (reported in `warnings()`).
- Splits train, val, test, each if present; test is unlabeled (label None).
- Order: train by class index then file name; val and test by file name.
- val inputs are the union of val/images/* and the files named in val_annotations.txt: an
  image with no annotation, or an annotation whose image is missing, is a failed sample,
  never a silently dropped one.  The boxes in the annotation file and in
  train/<wnid>/<wnid>_boxes.txt are not used.
"""
from __future__ import annotations

import os

from dynavit.manifests.inputs import open_text

from .base import RawSample, Source, SourceError, is_image_name, make_key, read_bytes, require_dir


def _images(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(e.name for e in os.scandir(folder)
                  if e.is_file() and is_image_name(e.name) and not e.name.startswith("."))


class TinyImageNetSource(Source):
    name = "tinyimagenet"

    def __init__(self, src: str):
        self.src = require_dir(src, self.name)
        if os.path.isfile(os.path.join(self.src, "wnids.txt")):
            self.root = self.src
        elif os.path.isfile(os.path.join(self.src, "tiny-imagenet-200", "wnids.txt")):
            self.root = os.path.join(self.src, "tiny-imagenet-200")
        else:
            raise SourceError(f"tinyimagenet: no wnids.txt in {self.src} or {self.src}/tiny-imagenet-200")
        path = os.path.join(self.root, "wnids.txt")
        with open_text(path) as f:
            wnids = [ln.strip() for ln in f if ln.strip()]
        if not wnids or len(set(wnids)) != len(wnids):
            raise SourceError(f"tinyimagenet: {path} is empty or lists a wnid twice")
        self._wnids = sorted(wnids)
        self._index = {w: i for i, w in enumerate(self._wnids)}
        self._names = self._read_words()
        self._splits = [s for s in ("train", "val", "test")
                        if os.path.isdir(os.path.join(self.root, s))]
        if not self._splits:
            raise SourceError(f"tinyimagenet: no train/, val/ or test/ in {self.root}")

    def _read_words(self) -> list[str]:
        path = os.path.join(self.root, "words.txt")
        words = {}
        if os.path.isfile(path):
            with open_text(path) as f:
                for n, ln in enumerate(f, 1):
                    if not ln.strip():
                        continue
                    parts = ln.rstrip("\r\n").split("\t", 1)
                    if len(parts) != 2:
                        raise SourceError(f"tinyimagenet: {path}:{n}: expected 'wnid<TAB>names'")
                    words[parts[0].strip()] = parts[1].strip()
        missing = [w for w in self._wnids if w not in words]
        if missing:
            self._warn(f"{path}: no name for {len(missing)} wnids (e.g. {missing[0]}); named by wnid")
        return [words.get(w, w) for w in self._wnids]

    def splits(self) -> list[str]:
        return list(self._splits)

    def classes(self) -> list[str]:
        return list(self._names)

    def _list(self, split: str):
        return getattr(self, f"_list_{split}")()

    # items: (relpath, label, error)
    def _list_train(self):
        train = os.path.join(self.root, "train")
        folders = sorted(e.name for e in os.scandir(train) if e.is_dir() and not e.name.startswith("."))
        unknown = [w for w in folders if w not in self._index]
        if unknown:
            raise SourceError(f"tinyimagenet: {os.path.join(train, unknown[0])} is not in wnids.txt")
        for wnid in self._wnids:
            for fn in _images(os.path.join(train, wnid, "images")):
                yield f"train/{wnid}/images/{fn}", self._index[wnid], None

    def _list_val(self):
        path = os.path.join(self.root, "val", "val_annotations.txt")
        if not os.path.isfile(path):
            raise SourceError(f"tinyimagenet: {path} is missing (val labels)")
        ann: dict[str, str] = {}
        with open_text(path) as f:
            for n, ln in enumerate(f, 1):
                if not ln.strip():
                    continue
                parts = ln.rstrip("\r\n").split("\t")
                if len(parts) < 2 or not parts[0] or parts[1] not in self._index:
                    raise SourceError(f"tinyimagenet: {path}:{n}: expected 'file<TAB>wnid<TAB>box'"
                                      " with a wnid from wnids.txt")
                if ann.setdefault(parts[0], parts[1]) != parts[1]:
                    raise SourceError(f"tinyimagenet: {path}:{n}: {parts[0]} is annotated twice")
        files = set(_images(os.path.join(self.root, "val", "images")))
        for fn in sorted(files | set(ann)):
            rel = f"val/images/{fn}"
            if fn not in ann:
                yield rel, None, "no entry in val/val_annotations.txt"
            else:
                yield rel, self._index[ann[fn]], None if fn in files else "missing file"

    def _list_test(self):
        for fn in _images(os.path.join(self.root, "test", "images")):
            yield f"test/images/{fn}", None, None

    def read_entry(self, split, ordinal, item) -> RawSample:
        rel, label, err = item
        name = None if label is None else self._names[label]
        source = os.path.relpath(os.path.join(self.root, rel), self.src).replace(os.sep, "/")
        data = None
        if err is None:
            data, err = read_bytes(os.path.join(self.root, rel))
        return RawSample(make_key(ordinal), source, label, name, data, err)
