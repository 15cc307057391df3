"""`voc5`: a 5-class single-label classification set cut from PASCAL VOC2012 detection data.

SRC is `VOCdevkit/VOC2012`, `VOCdevkit`, or the folder holding `VOCdevkit`; it needs
JPEGImages/<id>.jpg, Annotations/<id>.xml and ImageSets/Main/{train,val}.txt.

Decisions:
- Classes, sorted alphabetically: bicycle, car, cat, dog, person.
- Inputs are the ids of ImageSets/Main/<split>.txt (sorted) whose annotation has at least
  one object of those classes.  Images with none of them are not part of this dataset
  (they are not inputs; their count is in `warnings()`).
- Single label: the object with the largest box area among the 5 classes, counting
  non-difficult objects only unless all of them are difficult; ties go to the earlier
  object in the XML.  Area is (xmax - xmin + 1) * (ymax - ymin + 1): VOC boxes are
  inclusive 1-based pixel coordinates.
- An annotation that is missing, malformed, or declares a DOCTYPE/ENTITY (refused before
  parsing: the stdlib parser expands internal entities) is kept as a failed input,
  since whether it shows one of the classes is unknown.
- Annotations are parsed once, when the split is listed (~10k small files).
"""
from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET

from dynavit.manifests.inputs import open_text

from .base import RawSample, Source, SourceError, make_key, read_bytes, require_dir

CLASSES = ("bicycle", "car", "cat", "dog", "person")
_INDEX = {c: i for i, c in enumerate(CLASSES)}
_SPLITS = ("train", "val")  # VOC2012 test annotations are not public
_DTD = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


class AnnotationError(ValueError):
    pass


def label_from_xml(data: bytes) -> int | None:
    """The single label of one VOC annotation, or None when it has no object of CLASSES.
    Raises AnnotationError for documents that cannot be trusted or read."""
    if _DTD.search(data):
        raise AnnotationError("annotation declares a DOCTYPE/ENTITY; refused")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise AnnotationError(f"malformed annotation XML: {e}") from None
    cands = []  # (difficult, area, order, label)
    for order, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip().lower()
        if name not in _INDEX:
            continue
        box = obj.find("bndbox")
        try:
            x0, y0, x1, y1 = (float(box.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            raise AnnotationError(f"malformed annotation: object {order} ({name}) has no valid bndbox") from None
        difficult = (obj.findtext("difficult") or "0").strip() not in ("0", "")
        cands.append((difficult, (x1 - x0 + 1) * (y1 - y0 + 1), order, _INDEX[name]))
    if not cands:
        return None
    easy = [c for c in cands if not c[0]]
    pool = easy or cands
    # max area; among equal areas the smallest order (earlier in the XML)
    return max(pool, key=lambda c: (c[1], -c[2]))[3]


def find_voc_root(src: str, layout: str, folders: tuple[str, ...]) -> str:
    """The VOC2012 folder under SRC (SRC itself, SRC/VOC2012 or SRC/VOCdevkit/VOC2012) that
    holds `folders`; voc5 and voc-seg read the same devkit."""
    for cand in (src, os.path.join(src, "VOC2012"), os.path.join(src, "VOCdevkit", "VOC2012")):
        if all(os.path.isdir(os.path.join(cand, d)) for d in folders):
            return cand
    need = " and ".join(f"{d}/" for d in folders)
    raise SourceError(f"{layout}: no {need} in {src}, {src}/VOC2012 or {src}/VOCdevkit/VOC2012")


def read_image_ids(sets_dir: str, split: str, layout: str) -> list[str]:
    """The image ids of ImageSets/<task>/<split>.txt, sorted and unique. An id is data: one
    with a path separator or a leading dot is refused, not joined into a path."""
    path = os.path.join(sets_dir, f"{split}.txt")
    ids = []
    with open_text(path) as f:
        for n, ln in enumerate(f, 1):
            tok = ln.split()
            if not tok:
                continue
            if "/" in tok[0] or "\\" in tok[0] or tok[0].startswith("."):
                raise SourceError(f"{layout}: {path}:{n}: {tok[0]!r} is not an image id")
            ids.append(tok[0])
    return sorted(set(ids))


class Voc5Source(Source):
    name = "voc5"

    def __init__(self, src: str):
        self.src = require_dir(src, self.name)
        self.root = find_voc_root(self.src, self.name, ("JPEGImages", "Annotations"))
        self._sets = os.path.join(self.root, "ImageSets", "Main")
        self._splits = [s for s in _SPLITS if os.path.isfile(os.path.join(self._sets, f"{s}.txt"))]
        if not self._splits:
            raise SourceError(f"voc5: no train.txt or val.txt in {self._sets}")

    def splits(self) -> list[str]:
        return list(self._splits)

    def classes(self) -> list[str]:
        return list(CLASSES)

    def _list(self, split: str):
        items, excluded = [], 0
        for image_id in read_image_ids(self._sets, split, self.name):
            data, err = read_bytes(os.path.join(self.root, "Annotations", f"{image_id}.xml"))
            label = None
            if err is None:
                try:
                    label = label_from_xml(data)
                except AnnotationError as e:
                    err = str(e)
            else:
                err = f"annotation: {err}"
            if err is None and label is None:
                excluded += 1
                continue
            items.append((image_id, label, err))
        if excluded:
            self._warn(f"{split}: {excluded} images show none of {', '.join(CLASSES)}; not inputs")
        return items

    def read_entry(self, split, ordinal, item) -> RawSample:
        image_id, label, err = item
        path = os.path.join(self.root, "JPEGImages", f"{image_id}.jpg")
        source = os.path.relpath(path, self.src).replace(os.sep, "/")
        data = None
        if err is None:
            data, err = read_bytes(path)
        name = None if label is None else CLASSES[label]
        return RawSample(make_key(ordinal), source, label, name, data, err)
