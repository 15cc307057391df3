"""`wds`: an existing WebDataset (e.g. img2dataset output), indexed in place.

--src is one of (each may be prefixed `NAME=` to name its split; repeat --src for several
splits, e.g. `--src train=/d/train-{000..099}.tar --src val=/d/val-{000..009}.tar`):
- a brace pattern `path/{000000..000099}.tar` (expanded with braceexpand, in its order; every
  expanded local file must exist),
- a glob `path/*.tar` (sorted; local only),
- a single tar file,
- a URL or URL pattern: `http(s)://…`, `s3://…`, `gs://…` (fsspec), `pipe:COMMAND`, `file://…`
  (see `manifests.locations`); URLs are streamed,
- a directory: tars directly inside form one split; otherwise each subfolder that holds tars
  is a split named after it.  Tars named `topk-*` (index shards that dynaprep writes) and
  hidden files are not inputs.
Without `NAME=`, a pattern, glob, URL or single file forms the split named by the `split`
option ("train"), and so does a directory of tars. Tar suffixes: .tar, .tar.gz, .tgz.

One work unit per input tar; `image_shard(unit)` is its location relative to `images_root()`,
the common root of every input tar (recorded in dataset.json, overridable at training time).
A large local tar can be cut into pieces (`split_unit`): contiguous sample ranges found by a
header scan, read by offset, whose index fragments are joined in order into one index tar.

Samples are grouped exactly like webdataset does (manifests.tar.group_by_keys): key = member
path up to the first dot of its basename, suffix lower-cased, consecutive members with the
same key form one sample.  Keys are the user's keys verbatim.
- image: the first present of jpg, jpeg, png, webp, ppm; none -> failed sample;
- label (`label` option):
  - `auto` (default): the `.cls` member when there is one, else unlabelled;
  - `cls`: the `.cls` member (an ASCII int), required;
  - `json:FIELD`: a field of `KEY.json` (img2dataset keeps a caption and metadata there;
    FIELD may be a dotted path, `a.b`): an int is the class index, a string a class name;
  - `txt`: the caption in `KEY.txt`, as a class name;
  - `none`: unlabelled.
  Class names map to indices through `classes_file` (one name per line, line i = class i;
  a name not in it fails the sample); without one, the classes are every distinct name found,
  sorted, assigned when the manifests are merged. A sample without its label fails with the
  reason; it is never silently unlabelled.
- meta: the parsed `KEY.json` when present (padding-aware scoring reads img2dataset's sizes);
- source: "<tar basename>#<key>".
A key that appears twice in one local tar fails every copy (a stream fails the later copies,
and every reader takes the first); a sample with two members of the same suffix is a failed
sample (webdataset would raise). So is a key that is absolute or has a `..` part (it would
name a member outside the folder our index tar is extracted into) and a member over
`--max-file-bytes`.  A tar that cannot be opened or is truncated yields
what it could read plus one failed sample with key "__tar_error__NNNNNN".
"""
from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections import Counter

from dynavit.manifests import locations
from dynavit.manifests.inputs import max_file_bytes, open_regular, open_text
from dynavit.manifests.io import sha256_file
from dynavit.manifests.schema import IMAGE_EXTS
from dynavit.manifests.tar import COMPRESSED_SUFFIXES, TarError, group_by_keys, read_at, scan_members

from .base import RawSample, Source, SourceError, WorkUnit

try:
    from braceexpand import braceexpand
except ImportError:  # pragma: no cover - a dependency of dynavit
    braceexpand = None

IMAGE_SUFFIXES = IMAGE_EXTS
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
TAR_ERROR_KEY = "__tar_error__"
# A stream is read once: its first copy of a key is indexed before a later copy shows up, so
# the later copies fail and every reader (trainer, verify) takes the first.
DUPLICATE = "key appears again in this tar (non-adjacent members); the first copy is the sample"
_SPLIT_PREFIX = re.compile(r"^([A-Za-z0-9_-]+)=(.+)$")
LABEL_MODES = ("auto", "cls", "txt", "none", "json:FIELD")
MAX_CLASSES = 1_000_000  # the manifest's label is int32, the class list one name per class
MIN_PIECE = 32  # samples: a smaller piece costs more in scanning and joining than it spreads


def _is_input_tar(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES) and not name.startswith((".", "topk-"))


def _tars_in(folder: str) -> list[str]:
    return sorted(os.path.join(folder, e.name) for e in os.scandir(folder)
                  if e.is_file() and _is_input_tar(e.name))


def _seekable(location: str) -> bool:
    """A local uncompressed tar: read by offset, and can be cut into pieces."""
    return not locations.is_url(location) and not location.lower().endswith(COMPRESSED_SUFFIXES)


class WdsSource(Source):
    name = "wds"
    external_images = True

    def __init__(self, src, split: str = "train", classes_file: str | None = None, label: str = "auto"):
        specs = [src] if isinstance(src, str) else list(src or [])
        if not specs:
            raise SourceError("wds: --src is required (a tar, a {a..b} pattern, a glob, a URL or a folder)")
        self.label_mode, self.label_field = _parse_label(label)
        self.src = src
        self._splits: dict[str, list[str]] = {}
        for spec in specs:
            name, rest = split_spec(spec)
            named = name is not None
            for name, tars in self._resolve(rest, name if named else split, named).items():
                if name in self._splits:
                    raise SourceError(f"wds: split {name!r} is given twice in --src")
                self._splits[name] = tars
        all_tars = [t for tars in self._splits.values() for t in tars]
        try:
            self._root = locations.common_root(all_tars)
        except locations.LocationError as e:
            raise SourceError(f"wds: {e}") from None
        self._classes: list[str] = []
        if classes_file:
            try:
                with open_text(classes_file) as f:
                    self._classes = [ln.rstrip("\r\n") for ln in f if ln.strip()]
            except OSError as e:
                raise SourceError(f"wds: cannot read classes file {classes_file}: {e.strerror or e}") from None
        self._class_index = {name: i for i, name in enumerate(self._classes)}
        self._digests: dict[str, tuple[str, int]] = {}

    @staticmethod
    def _resolve(src: str, split: str, named: bool) -> dict[str, list[str]]:
        if locations.is_url(src):
            if braceexpand is None:  # pragma: no cover
                raise SourceError("wds: URLs need the braceexpand package")
            return {split: list(braceexpand(src))}
        src = locations.local_path(src)
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
            return {split if named else "train": direct}
        if named:
            raise SourceError(f"wds: no .tar files in {root}")
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

    def images_root(self) -> str:
        """The folder (or URL prefix) every input tar lies under; shard paths are relative to it."""
        return self._root

    def units(self, split: str, shard_size: int = 0, order_seed: int | None = None) -> list[WorkUnit]:
        # The user's tars are indexed in place: one unit per tar, in the tar's own order
        # (shard_size and order_seed do not apply; the trainer's epochs are exact anyway).
        self._check_split(split)
        return [WorkUnit(split, i, loc) for i, loc in enumerate(self._splits[split])]

    def image_shard(self, unit: WorkUnit) -> str | None:
        return locations.relative(_location(unit), self._root)

    def image_digest(self, unit: WorkUnit) -> tuple[str, int]:
        """(sha256, bytes) of the unit's tar: hashed while it was streamed, or from disk."""
        loc = _location(unit)
        if loc in self._digests:
            return self._digests[loc]
        if locations.is_url(loc):
            return "", 0  # the stream broke before its end: no checksum to record
        return sha256_file(locations.local_path(loc))

    def split_unit(self, unit: WorkUnit, parts: int) -> list[WorkUnit]:
        """Contiguous sample ranges of a local uncompressed tar (at least MIN_PIECE samples
        each); [unit] when it cannot be cut (a stream, a compressed or unreadable tar)."""
        loc = _location(unit)
        if parts < 2 or not _seekable(loc):
            return [unit]
        try:
            n = sum(1 for _ in group_by_keys(scan_members(locations.local_path(loc))))
        except TarError:
            return [unit]  # read as a stream, which reports how far it got
        parts = min(parts, n // MIN_PIECE)
        if parts < 2:
            return [unit]
        bounds = [n * i // parts for i in range(parts + 1)]
        return [WorkUnit(unit.split, unit.index, (loc, bounds[i], bounds[i + 1]), bounds[i + 1] - bounds[i],
                         part=i, parts=parts) for i in range(parts)]

    # --- reading --------------------------------------------------------------------------
    def read_unit(self, unit: WorkUnit):
        if isinstance(unit.payload, tuple):
            loc, lo, hi = unit.payload
        else:
            loc, lo, hi = unit.payload, 0, None
        if _seekable(loc):
            try:
                yield from self._read_by_offset(unit, loc, lo, hi)
                return
            except TarError:
                if lo or hi is not None:
                    raise  # a piece of a tar that changed since it was cut; the unit is redone whole
        yield from self._read_stream(unit, loc)

    def _read_by_offset(self, unit, loc: str, lo: int, hi: int | None):
        path = locations.local_path(loc)
        samples = list(group_by_keys(scan_members(path)))  # raises TarError before any sample
        # The whole tar is known: every copy of a repeated key fails, so no reader can pair
        # one copy's image with another's label or indices (the trainer's scan keeps the first).
        counts = Counter(key for key, _, _ in samples)
        tar_name = os.path.basename(path)
        fd = open_regular(path)
        try:
            for key, group, problem in samples[lo:hi]:
                if counts[key] > 1:
                    problem = f"key appears {counts[key]} times in this tar; every copy is left out"
                big = next((m for m in group.values() if m.size > max_file_bytes()), None)
                if big is not None:  # not read: a member's size is the tar's word, not a limit
                    yield self._sample(tar_name, key, {}, problem or _too_big(big.name, big.size))
                    continue
                yield self._sample(tar_name, key, {ext: read_at(fd, m) for ext, m in group.items()}, problem,
                                   {ext: (m.offset, m.size) for ext, m in group.items()})
        finally:
            os.close(fd)

    def _read_stream(self, unit, loc: str):
        tar_name = loc.rstrip("/").rsplit("/", 1)[-1]
        failure: list[BaseException] = []
        hashing = None

        def members():  # (name, bytes) of every regular member, streamed (also .tar.gz)
            nonlocal hashing
            stream = None
            try:
                stream = locations.open_stream(loc)
                hashing = locations.HashingReader(stream)
                with tarfile.open(fileobj=hashing, mode="r|*") as tf:
                    # offsets in the stream are offsets in the file only when it is not compressed
                    plain = getattr(tf.fileobj, "comptype", None) == "tar"
                    for info in tf:
                        if info.isreg():
                            yield (info.name, (tf.extractfile(info).read() if info.size <= max_file_bytes()
                                               else TooBig(info.name, info.size)),
                                   (info.offset_data, info.size) if plain else None)
                        tf.members = []  # streaming: do not keep every TarInfo
                self._digests[loc] = hashing.finish()
            except (OSError, tarfile.TarError, EOFError) as e:
                failure.append(e)
            finally:
                if stream is not None:
                    try:
                        stream.close()
                    except OSError as e:
                        failure.append(e)

        seen: set[str] = set()

        def finish(key, group, problem):
            if key in seen:
                problem = DUPLICATE
            seen.add(key)
            big = next((data for _, data, _ in group.values() if isinstance(data, TooBig)), None)
            if big is not None:
                return self._sample(tar_name, key, {}, problem or _too_big(big.name, big.size))
            return self._sample(tar_name, key, {ext: data for ext, (_, data, _) in group.items()}, problem,
                                {ext: where for ext, (_, _, where) in group.items() if where is not None})

        last = None
        for sample in group_by_keys(members()):  # webdataset's grouping rule, shared with the trainer
            if last is not None:
                yield finish(*last)
            last = sample
        if last is not None:
            key, group, problem = last
            yield finish(key, group, problem or ("tar ends inside this sample" if failure else None))
        if failure and isinstance(failure[0], locations.TruncatedDownload):
            # Not a broken tar but a broken download: the unit fails (exit 1, --resume redoes
            # it) rather than ending with half the samples and the hash of half the bytes.
            raise failure[0]
        if failure:
            # One per unreadable tar; the unit index keeps the key unique within the split.
            yield RawSample(f"{TAR_ERROR_KEY}{unit.index:06d}", f"{tar_name}#", None, None, None,
                            f"unreadable tar {loc}: {failure[0]}")

    def _sample(self, tar_name: str, key: str, members: dict, err: str | None,
                where: dict | None = None) -> RawSample:
        """`where`: ext -> (data offset, size) in the tar, for the members whose place is known."""
        source = f"{tar_name}#{key}"
        if err is None and unsafe_key(key):
            # The key names our index tars' members: `../x` or `/x` would be extracted outside
            # the folder by `tar x`. It is the user's data, so the sample fails, saying why.
            err = f"unsafe member name {key[:80]!r} (absolute, or with a '..' part)"
        img_ext = next((s for s in IMAGE_SUFFIXES if s in members), None)  # the trainer's choice too (shards.py)
        img = members[img_ext] if img_ext is not None else None
        if err is None and img is None:
            dotted = [s for s in members if "." in s and s.rsplit(".", 1)[1] in IMAGE_SUFFIXES]
            err = f"no image member (members: {', '.join(sorted(members)) or 'none'})"
            if dotted:
                err += f"; {key}.{dotted[0]} has a dot in its basename, so webdataset splits it" \
                       f" into key {key!r} and suffix {dotted[0]!r}"
        meta = _json(members.get("json"))
        label = name = None
        if err is None:
            label, name, err = self._label(members, meta)
        if err is not None:
            return RawSample(key, source, None, None, None, err)
        return RawSample(key, source, label, name, img, None, meta if isinstance(meta, dict) else None,
                         (where or {}).get(img_ext))

    def _label(self, members: dict, meta) -> tuple[int | None, str | None, str | None]:
        """(label, class name, error) of one sample under the `label` option."""
        mode = self.label_mode
        if mode == "none" or (mode == "auto" and "cls" not in members):
            return None, None, None
        if mode in ("auto", "cls"):
            if "cls" not in members:
                return None, None, f"no .cls member (members: {', '.join(sorted(members))}; label=cls)"
            try:
                value = int(members["cls"].decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                return None, None, f"cls is not an integer: {members['cls'][:20]!r}"
        elif mode == "txt":
            if "txt" not in members:
                return None, None, f"no .txt member (members: {', '.join(sorted(members))}; label=txt)"
            try:
                value = members["txt"].decode("utf-8").strip()
            except UnicodeDecodeError:
                return None, None, "txt is not UTF-8 text"
            if not value:
                return None, None, "txt is empty (label=txt)"
        else:  # json:FIELD
            if "json" not in members:
                return None, None, f"no .json member (members: {', '.join(sorted(members))}; label=json:{self.label_field})"
            if not isinstance(meta, dict):
                return None, None, "json is not a JSON object"
            value = meta
            for part in self.label_field.split("."):
                if not isinstance(value, dict) or part not in value:
                    return None, None, f"json has no field {self.label_field!r}"
                value = value[part]
            if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
                return None, None, f"json field {self.label_field!r} is {value!r}, not a class index or name"
        return self._class_of(value)

    def _class_of(self, value) -> tuple[int | None, str | None, str | None]:
        if isinstance(value, int):
            if value >= MAX_CLASSES:  # a class list (and a classifier head) of that size is a bad label
                return None, None, f"label {value} is not below {MAX_CLASSES} (classes dynaprep accepts)"
            if not self._classes:
                return value, None, None if value >= 0 else f"label {value} is negative"
            if 0 <= value < len(self._classes):
                return value, self._classes[value], None
            return None, None, f"label {value} is outside the {len(self._classes)} classes of the classes file"
        if not self._classes:
            return None, value, None  # a name: its index is assigned when the manifests are merged
        if value in self._class_index:
            return self._class_index[value], value, None
        return None, None, f"class {value[:60]!r} is not in the classes file"


class TooBig:
    """A stream member over --max-file-bytes, not read."""

    def __init__(self, name: str, size: int):
        self.name, self.size = name, size


def _too_big(name: str, size: int) -> str:
    return f"member {name} is {size} bytes, over the {max_file_bytes()}-byte cap (--max-file-bytes)"


def unsafe_key(key: str) -> bool:
    """A key that would put a member outside the folder a tar is extracted into."""
    return key.startswith("/") or ".." in key.split("/") or "\0" in key


def split_spec(spec: str) -> tuple[str | None, str]:
    """(split name, source) of a --src `NAME=SOURCE`; (None, spec) when it has no such
    prefix (a path or URL that merely contains '=' is not split)."""
    m = _SPLIT_PREFIX.match(spec)
    if m is None or os.path.exists(spec) or locations.is_url(spec):
        return None, spec
    return m.group(1), m.group(2)


def _location(unit: WorkUnit) -> str:
    return unit.payload[0] if isinstance(unit.payload, tuple) else unit.payload


def _json(data: bytes | None):
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None


def _parse_label(label) -> tuple[str, str | None]:
    label = str(label)
    if label.startswith("json:") and len(label) > 5:
        return "json", label[5:]
    if label in ("auto", "cls", "txt", "none"):
        return label, None
    raise SourceError(f"wds: label={label!r}; valid: {', '.join(LABEL_MODES)}")
