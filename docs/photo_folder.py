"""Write `make compare-demo`'s real data: a class-sorted ImageFolder of scikit-image's sample
photos (OUT/{train,val}/<photo>/*.png, 10 classes, class = which photo a random crop is from;
dynavit.pipeline.photo_data.photo_crops). scikit-image is in the lock file (`make venv`).

    .venv/bin/python docs/photo_folder.py OUT [--n-train 1500] [--n-val 500] [--size 128] [--seed 0]

Refuses an OUT that already holds files (exit 2), so that a stale set is never mixed in.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dynavit.pipeline.photo_data import MissingExtra, photo_crops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--n-train", type=int, default=1500)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if min(a.n_train, a.n_val, a.size) < 1:
        print("photo_folder: --n-train, --n-val and --size must be >= 1", file=sys.stderr)
        return 2
    if a.out.exists() and any(a.out.iterdir()):
        print(f"photo_folder: {a.out} is not empty", file=sys.stderr)
        return 2
    try:
        info = photo_crops(a.out, a.n_train, a.n_val, size=a.size, seed=a.seed)
    except MissingExtra as e:
        print(f"photo_folder: {e}", file=sys.stderr)
        return 2
    print(f"photo_folder: {a.n_train} train + {a.n_val} val images of {len(info['classes'])} classes in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
