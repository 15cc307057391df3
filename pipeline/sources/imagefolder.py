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
- Symlinks are followed, but no folder is listed twice (known by st_dev, st_ino): a loop
  (`class/sub/loop -> ..`), a link to the split or to another class folder is skipped and
  reported in `warnings()`; a file symlink to an image listed anyway counts once.
- A folder that cannot be listed (permissions, I/O error) is an input of its own: a failed
  manifest row `<relpath>/` with the reason, so `--strict` fails and nothing vanishes
  silently. An unreadable SRC or split folder is a SourceError (one line, at planning).
- An empty class folder (no images) is reported in `warnings()` and `problems()`:
  `--strict` exits 1 on it (torchvision's ImageFolder refuses it).
- `source` is the path relative to SRC; data is the raw file bytes.
"""
from __future__ import annotations

import os

from .base import RawSample, Source, SourceError, is_image_name, make_key, read_bytes, require_dir

_ORDER = {"train": 0, "val": 1, "test": 2}
_STANDARD = ("train", "val", "valid", "validation", "test")


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks
    except OSError:  # as os.walk does: an entry that cannot be stat'ed is not a folder
        return False


def _scandir(path: str) -> list[os.DirEntry]:
    """The entries of a folder in name order; a folder that cannot be listed is a
    SourceError naming it (at planning: one line, not a traceback)."""
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise SourceError(f"cannot list {path}: {e.strerror or e}") from None


def _subdirs(path: str) -> list[str]:
    return [e.name for e in _scandir(path) if _is_dir(e) and not e.name.startswith(".")]


def _has_images(path: str) -> bool:
    return any(e.is_file() and is_image_name(e.name) for e in _scandir(path))


def _ident(path: str):
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _unreadable(err: OSError) -> str:
    return f"unreadable folder: {err.strerror or err}"


class _Walk:
    """Lists the files below the folders of one split, following symlinks (as ImageFolder
    does) without ever listing a folder twice: folders are known by (st_dev, st_ino), so a
    symlink loop (`class/sub/loop -> ..`) or a second link to a folder is skipped and
    reported. A file symlink to an image listed anyway (the real file, or an earlier link
    to it) counts once: the real file keeps its place. Only links can reach a file twice
    once folders are unique, so only links are resolved (one realpath per folder and per
    linked file, not per file). Order is deterministic: entries in name order, depth first."""

    def __init__(self, src: str):
        self.src = src
        self.seen: dict = {}          # (dev, ino) -> relpath of the folder that lists it
        self.real_dirs: set[str] = set()
        self.links: list[tuple[str, str]] = []  # (relpath, realpath) of linked image files
        self.skipped: list[str] = []  # non-image and hidden files
        self.nested: list[str] = []   # folders inside a flat split
        self.repeats: list[tuple[str, str]] = []  # (folder, the folder it is) not listed again
        self.duplicates: list[tuple[str, str]] = []

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.src).replace(os.sep, "/")

    def reserve(self, path: str) -> None:
        try:
            self.seen.setdefault(_ident(path), self.rel(path))
        except OSError:
            pass  # files() reports it

    def files(self, root: str, flat: bool) -> list[tuple[str, str | None]]:
        """(relpath, None) per input file below root; (relpath + "/", reason) per folder
        that cannot be listed."""
        found: list[tuple[str, str | None]] = []
        try:
            first = self.seen.get(_ident(root))
        except OSError:
            first = None
        if first is not None and first != self.rel(root):  # class b -> a: a lists them
            self.repeats.append((self.rel(root), first))
            return found
        stack = [root]
        while stack:
            folder = stack.pop()
            rel_folder = self.rel(folder)
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
                self.real_dirs.add(os.path.realpath(folder))
            except OSError as e:
                found.append((rel_folder + "/", _unreadable(e)))
                continue
            subdirs = []
            for e in entries:
                rel = f"{rel_folder}/{e.name}"
                if _is_dir(e):
                    if e.name.startswith("."):
                        continue  # .git, .ipynb_checkpoints, ...: not data
                    (self.nested if flat else subdirs).append(e)
                elif is_image_name(e.name) and not e.name.startswith("."):
                    found.append((rel, None))
                    if e.is_symlink():
                        self.links.append((rel, os.path.realpath(e.path)))
                else:
                    self.skipped.append(rel)
            for e in reversed(subdirs):  # popped in name order
                rel = f"{rel_folder}/{e.name}"
                try:
                    ident = _ident(e.path)
                except OSError as err:
                    found.append((rel + "/", _unreadable(err)))
                    continue
                if ident in self.seen:
                    self.repeats.append((rel, self.seen[ident]))
                    continue
                self.seen[ident] = rel
                stack.append(e.path)
        return found

    def link_duplicates(self) -> set[str]:
        """Relpaths of linked files whose image is listed anyway."""
        drop, targets = set(), set()
        for rel, target in self.links:
            folder, name = os.path.split(target)
            real_listed = (folder in self.real_dirs and is_image_name(name) and not name.startswith(".")
                           and not os.path.islink(target) and os.path.isfile(target))
            if real_listed or target in targets:
                drop.add(rel)
                self.duplicates.append((rel, self.rel(target)))
            targets.add(target)
        return drop

    def report(self, split: str, warn) -> None:
        if self.skipped:
            warn(f"{split}: {len(self.skipped)} non-image files are not inputs (e.g. {self.skipped[0]})")
        if self.nested:
            warn(f"{split}: {len(self.nested)} folders inside a flat split are not inputs"
                 f" (e.g. {self.rel(self.nested[0].path)})")
        if self.repeats:
            rel, first = self.repeats[0]
            warn(f"{split}: {len(self.repeats)} symlinked folders lead to a folder listed already"
                 f" (symlink loop or second link); not listed again (e.g. {rel} -> {first})")
        if self.duplicates:
            rel, target = self.duplicates[0]
            warn(f"{split}: {len(self.duplicates)} symlinked files point at images listed already;"
                 f" counted once (e.g. {rel} -> {target})")


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
        """(relpath, label) in key order, class by class; a folder that cannot be listed is
        an item (relpath + "/", label, reason) that becomes a failed row, so its images are
        never lost without a trace."""
        folders = self._splits[split]
        split_root = os.path.join(self.src, split)
        if folders is None:
            groups = [(split_root, None, None)]
        else:
            groups = [(os.path.join(split_root, c), self._index[c], c) for c in folders]
        walk = _Walk(self.src)
        for root in [split_root, *(g[0] for g in groups)]:
            walk.reserve(root)  # a link to the split or to a class folder never lists it again
        listed = [(label, name, walk.files(root, flat=folders is None)) for root, label, name in groups]
        duplicates = walk.link_duplicates()
        for label, name, found in listed:
            found = [f for f in found if f[0] not in duplicates]
            if not found and name is not None:
                # torchvision's ImageFolder refuses this; here it is a warning and --strict fails.
                self._warn(f"{split}/{name}: empty class folder (no images): class {label} has no"
                           f" {split} samples", problem=True)
            for rel, err in sorted(found):
                yield (rel, label) if err is None else (rel, label, err)
        walk.report(split, self._warn)

    def read_entry(self, split, ordinal, item) -> RawSample:
        rel, label, *err = item
        name = None if label is None else self._classes[label]
        if err:  # a folder that could not be listed
            return RawSample(make_key(ordinal), rel, label, name, None, err[0])
        data, err = read_bytes(os.path.join(self.src, rel))
        return RawSample(make_key(ordinal), rel, label, name, data, err)


class ImageNetSource(ImageFolderSource):
    """ImageNet-1k after the usual preparation (train/ and val/ in wnid class folders)."""
    name = "imagenet"

    def __init__(self, src: str):
        super().__init__(src)
        if "train" not in self._splits:
            raise SourceError(f"imagenet: no train/ class folders in {self.src}")
