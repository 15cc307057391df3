"""click parameter types shared by both CLIs.

click's FloatRange compares with <, > only, and every comparison with NaN is False, so
`--lr nan` passed any range; `inf` passed every unbounded one. FiniteFloat refuses both
(exit 2, one line naming the option) with or without a range.
"""
from __future__ import annotations

import math

import click


class FiniteFloat(click.FloatRange):
    """A finite float, optionally in a range (click.FloatRange's arguments)."""

    name = "float"

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return v


FINITE_FLOAT = FiniteFloat()
# Pixels per side of an image the tools make or read whole: --image-size 1000000 would ask
# for a ~100 GiB array per image before anything said no.
MAX_IMAGE_SIZE = 8192

__all__ = ["FINITE_FLOAT", "MAX_IMAGE_SIZE", "FiniteFloat"]
