"""Dataset readers for `dynaprep index --data NAME --src SRC` (interface: base.py)."""
from __future__ import annotations

import inspect

from .base import RawSample, Source, SourceError, WorkUnit, make_key
from .cifar100 import Cifar100Source
from .demo import DemoSource
from .imagefolder import ImageFolderSource, ImageNetSource
from .tinyimagenet import TinyImageNetSource
from .voc import Voc5Source
from .vocseg import VocSegSource
from .wds import WdsSource

SOURCES: dict[str, type[Source]] = {
    "imagenet": ImageNetSource,
    "imagefolder": ImageFolderSource,
    "cifar100": Cifar100Source,
    "tinyimagenet": TinyImageNetSource,
    "voc5": Voc5Source,
    "voc-seg": VocSegSource,
    "wds": WdsSource,
    "demo": DemoSource,
}

__all__ = ["SOURCES", "open_source", "RawSample", "Source", "SourceError", "WorkUnit", "make_key"]


def open_source(name: str, src: str | None, **options) -> Source:
    """Open dataset `name` at `src`.  Unknown names and options raise ValueError;
    dataset-level problems raise SourceError."""
    cls = SOURCES.get(name)
    if cls is None:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(sorted(SOURCES))}")
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(k for k in options if k not in params or k in ("self", "src"))
    if unknown:
        valid = [p for p in params if p not in ("self", "src")]
        raise ValueError(f"dataset {name!r} does not take option(s) {', '.join(unknown)}"
                         f" (valid: {', '.join(valid) or 'none'})")
    return cls(src, **options)
