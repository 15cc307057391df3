"""click parameter types shared by both CLIs.

click's FloatRange compares with <, > only, and every comparison with NaN is False, so
`--lr nan` passed any range; `inf` passed every unbounded one. FiniteFloat refuses both
(exit 2, one line naming the option) with or without a range.
"""
from __future__ import annotations

import json
import math

import click

from dynavit.manifests.options import parse_k_list


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



def out_dir(ctx, param, value):
    """click callback: a folder the command will create or fill, checked while parsing
    (before any work): not an existing file, not under a file, writable."""
    from dynavit.manifests.options import ArgumentError, check_output_dir

    if value is not None:
        try:
            check_output_dir(value, None)
        except ArgumentError as e:
            raise click.BadParameter(str(e)) from None
    return value


def out_file(ctx, param, value):
    """click callback: a file the command will write, checked while parsing: not a folder,
    not under a file, in a writable folder."""
    from dynavit.manifests.options import ArgumentError, check_output_file

    if value is not None:
        try:
            check_output_file(value, None)
        except ArgumentError as e:
            raise click.BadParameter(str(e)) from None
    return value


__all__ = ["FINITE_FLOAT", "MAX_IMAGE_SIZE", "FiniteFloat", "out_dir", "out_file"]


def k_list(ctx, param, value: str) -> list[int]:
    """click callback around the one K-list parser: a bad --k is a usage error (exit 2)."""
    try:
        return parse_k_list(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def json_object(ctx, param, value):
    """click callback: a JSON object option (e.g. --model-kwargs)."""
    if value is None:
        return {}
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise click.BadParameter("must be a JSON object, e.g. '{\"drop_path_rate\": 0.1}'")
    return obj
