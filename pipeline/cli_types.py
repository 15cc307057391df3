"""click parameter types shared by both CLIs.

click's FloatRange compares with <, > only, and every comparison with NaN is False, so
`--lr nan` passed any range; `inf` passed every unbounded one. FiniteFloat refuses both
(exit 2, one line naming the option) with or without a range.
"""
from __future__ import annotations

import functools
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


# --- one vocabulary (docs/CLI.md; tests/test_cli_vocabulary.py walks every command) ---------

AMP_CHOICES = ("auto", "off", "bf16", "fp16")


class AmpType(click.Choice):
    """--amp everywhere: auto (bf16 on CUDA, off on CPU), off, bf16 or fp16."""

    def __init__(self):
        super().__init__(AMP_CHOICES)


def resolve_amp_name(amp: str, device: str) -> str:
    """`auto` made concrete for a device: bf16 on CUDA, off elsewhere."""
    if amp != "auto":
        return amp
    return "bf16" if str(device).startswith("cuda") else "off"


class DeviceType(click.ParamType):
    """--device everywhere: auto, cpu, cuda or cuda:N (and meta where counting allows it).
    An explicit CUDA device on a machine without one is a usage error. With resolve=True the
    value comes back concrete (auto: cuda if available, else cpu); train keeps `auto`, which
    it resolves per rank."""

    name = "device"

    def __init__(self, resolve: bool = True, meta: bool = False, index: bool = True):
        self.resolve, self.meta, self.index = resolve, meta, index

    def get_metavar(self, param, ctx=None) -> str:
        return "[" + "|".join(["auto", "cpu", "cuda" + ("[:N]" if self.index else "")] + (["meta"] if self.meta else [])) + "]"

    def convert(self, value, param, ctx):
        text = str(value).strip().lower()
        if text == "meta" and self.meta:
            return text
        kind, _, num = text.partition(":")
        if kind not in ("auto", "cpu", "cuda") or (num and (kind != "cuda" or not num.isdigit() or not self.index)):
            self.fail(f"{value!r} is not a device: use {self.get_metavar(param).strip('[]').replace('|', ', ')}",
                      param, ctx)
        if kind == "cpu" or (kind == "auto" and not self.resolve):
            return text
        import torch  # only when a CUDA question is asked: dynaprep never imports torch

        if kind == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if not torch.cuda.is_available():
            self.fail(f"{value}: CUDA is not available on this machine", param, ctx)
        if num and int(num) >= torch.cuda.device_count():
            self.fail(f"{value}: only {torch.cuda.device_count()} CUDA device(s)", param, ctx)
        return text


def renamed(old: str, new: str, dest: str, **option_kwargs):
    """Decorator: `old`, a spelling of option `new` that shipped, kept one release as a
    hidden alias. Using it prints one deprecation line and sets `dest`; giving both is a
    usage error. Put it above the command's other options (under @click.command)."""
    hidden_dest = "renamed_" + old.lstrip("-").replace("-", "_")

    def decorate(f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            value = kwargs.pop(hidden_dest)
            if value is not None:
                ctx = click.get_current_context()
                if ctx.get_parameter_source(dest) == click.core.ParameterSource.COMMANDLINE:
                    raise click.UsageError(f"{old} is the old spelling of {new}: give one of them")
                click.echo(f"warning: {old} is deprecated and will be removed; use {new}", err=True)
                kwargs[dest] = value
            return f(*args, **kwargs)

        return click.option(old, hidden_dest, hidden=True, default=None, **option_kwargs)(wrapper)

    return decorate


def plural(n: int, noun: str) -> str:
    """'1 shard', '2 shards': the summaries a command prints."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


__all__ = ["AMP_CHOICES", "plural", "FINITE_FLOAT", "MAX_IMAGE_SIZE", "AmpType", "DeviceType", "FiniteFloat", "json_object",
           "k_list", "out_dir", "out_file", "renamed", "resolve_amp_name"]
