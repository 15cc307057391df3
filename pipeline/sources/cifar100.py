"""`cifar100`: the official "python version" release (cifar-100-python/{train,test,meta}).

SRC is the `cifar-100-python` folder or its parent.  Splits: train, test.  Labels are the
fine labels (100 classes, names from meta's fine_label_names, in label order).  Data is a
uint8 [32, 32, 3] array; source is "<path of the batch file relative to SRC>#<row>".

The batch files are pickles, and unpickling runs code named in the file.  They are loaded
with a restricted unpickler that only admits the three globals a numpy array needs, plus
`_codecs.encode(str, 'latin1')` (how Python 3 writes bytes in a protocol-2 pickle, e.g. a
re-pickled meta file); anything else (os.system, eval, ...) is refused before it is called.
"""
from __future__ import annotations

import functools
import io
import os
import pickle

import numpy as np

from dynavit.manifests.inputs import METADATA_LIMIT, read_regular

from .base import RawSample, Source, SourceError, make_key, require_dir

_SPLITS = ("train", "test")


def _allowed():
    try:  # numpy >= 2 moved the implementation; old pickles still name numpy.core
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }


def _latin1_encode(text, encoding="latin1", *rest):
    """`_codecs.encode` as Python 3 uses it to write bytes in a protocol-2 pickle
    (`_codecs.encode(str, 'latin1')`, which torch's weights_only unpickler also admits);
    nothing else: other codecs and non-str arguments are refused."""
    if type(text) is not str or encoding not in ("latin1", "latin-1") or rest:
        raise pickle.UnpicklingError("refusing _codecs.encode other than (str, 'latin1')")
    return text.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    _ALLOWED = _allowed()

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing global {module}.{name} (only numpy array reconstruction is allowed)"
            ) from None


def restricted_load(data: bytes):
    """Unpickle CIFAR batch bytes; raises pickle.UnpicklingError for anything but plain
    containers and numpy arrays."""
    return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


@functools.lru_cache(maxsize=4)
def _load(path: str, _mtime_ns: int, _size: int) -> dict:
    # Cached per process: work units run in worker processes and each reads hundreds of rows
    # of the same 150 MB file.  (mtime, size) in the key notices a replaced file.
    try:
        obj = restricted_load(read_regular(path, METADATA_LIMIT))  # no FIFO, no device
    except OSError as e:
        raise SourceError(f"cifar100: cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ... from a bad file
        raise SourceError(f"cifar100: {path} is not a CIFAR pickle: {e}") from None
    if not isinstance(obj, dict):
        raise SourceError(f"cifar100: {path} is not a CIFAR pickle (top level is {type(obj).__name__})")
    return obj


@functools.lru_cache(maxsize=4)
def _checked(path: str, mtime_ns: int, size: int, n_classes: int) -> tuple[np.ndarray, list]:
    d = _load(path, mtime_ns, size)
    data, labels = d.get(b"data"), d.get(b"fine_labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072:
        raise SourceError(f"cifar100: {path}: b'data' is not a uint8 [N, 3072] array")
    if not isinstance(labels, list) or len(labels) != data.shape[0]:
        raise SourceError(f"cifar100: {path}: b'fine_labels' does not match b'data'")
    bad = [v for v in labels if type(v) is not int or not 0 <= v < n_classes]
    if bad:
        raise SourceError(f"cifar100: {path}: fine label {bad[0]!r} out of range")
    return data, labels


def load_pickle(path: str) -> dict:
    st = os.stat(path)
    return _load(os.path.abspath(path), st.st_mtime_ns, st.st_size)


class Cifar100Source(Source):
    name = "cifar100"

    def __init__(self, src: str):
        src = require_dir(src, self.name)
        self.src = src
        sub = os.path.join(src, "cifar-100-python")
        if os.path.isfile(os.path.join(src, "meta")):
            self.root = src
        elif os.path.isfile(os.path.join(sub, "meta")):
            self.root = sub
        else:
            raise SourceError(f"cifar100: no cifar-100-python/meta under {src}"
                              " (extract cifar-100-python.tar.gz and point --src at it)")
        self._splits = [s for s in _SPLITS if os.path.isfile(os.path.join(self.root, s))]
        if not self._splits:
            raise SourceError(f"cifar100: neither train nor test in {self.root}")
        meta_path = os.path.join(self.root, "meta")
        names = load_pickle(meta_path).get(b"fine_label_names")
        if not isinstance(names, list) or not names:
            raise SourceError(f"cifar100: {meta_path} has no fine_label_names")
        self._classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]

    def splits(self) -> list[str]:
        return list(self._splits)

    def classes(self) -> list[str]:
        return list(self._classes)

    def _path(self, split: str) -> str:
        return os.path.join(self.root, split)

    def _batch(self, split: str) -> tuple[np.ndarray, list]:
        path = self._path(split)
        st = os.stat(path)
        return _checked(os.path.abspath(path), st.st_mtime_ns, st.st_size, len(self._classes))

    def entries(self, split: str):
        self._check_split(split)
        return range(self._batch(split)[0].shape[0])

    def read_entry(self, split, ordinal, row) -> RawSample:
        data, labels = self._batch(split)
        # Rows hold the R, G and B planes of a 32x32 image one after another.
        img = np.ascontiguousarray(data[row].reshape(3, 32, 32).transpose(1, 2, 0))
        rel = os.path.relpath(self._path(split), self.src).replace(os.sep, "/")
        label = int(labels[row])
        return RawSample(make_key(ordinal), f"{rel}#{row}", label, self._classes[label], img)
