"""Issue 23: every option of every command, given nonsense (NaN, inf, a negative or huge
number, the wrong type, an output path under a file), is refused while the arguments are
parsed: exit 2, one `Error:` line naming the option, nothing written.

The commands are introspected (click), so a new option is walked too. Only parsing runs
(`make_context` converts every value and runs every callback): no training, no indexing.
"""
from __future__ import annotations

import os
from pathlib import Path

import click
import pytest

from dynavit.pipeline.cli import main as dynaprep_group
from dynavit.trainer.cli import cli as dynatrain_group
from dynavit.trainer.cli import main as dynatrain_main

OUTPUT_NAMES = {"out", "json_path", "json_out", "png", "out_dir"}


def _commands():
    for prog, group in (("dynaprep", dynaprep_group), ("dynatrain", dynatrain_group)):
        for name, command in sorted(group.commands.items()):
            yield prog, name, command


def _options(kind):
    for prog, name, command in _commands():
        for param in command.params:
            if isinstance(param, click.Option) and not param.is_flag and param.nargs == 1 \
                    and kind(param):
                yield pytest.param(prog, name, command, param, id=f"{prog}-{name}-{param.opts[-1]}")


def _refused(command, name, param, value):
    """The BadParameter that parsing `param value` alone raises for `param`, or None."""
    try:
        command.make_context(name, [param.opts[-1], value], resilient_parsing=False)
    except click.BadParameter as e:
        if not isinstance(e, click.MissingParameter) and e.param is not None and e.param.name == param.name:
            return e
        raise AssertionError(f"{param.opts[-1]} {value!r}: another parameter failed first: {e}") from None
    except click.UsageError as e:  # e.g. a group-level check: not this option's refusal
        raise AssertionError(f"{param.opts[-1]} {value!r}: {e}") from None
    return None


def _is_float(p):
    return isinstance(p.type, click.types.FloatParamType)


def _is_int(p):
    return isinstance(p.type, click.types.IntParamType)


@pytest.mark.parametrize("prog, name, command, param", list(_options(_is_float)))
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400", "abc"])
def test_float_options_refuse_non_finite_and_non_numbers(prog, name, command, param, value):
    assert _refused(command, name, param, value) is not None


@pytest.mark.parametrize("prog, name, command, param", list(_options(_is_int)))
@pytest.mark.parametrize("value", ["abc", "1.5", "nan", ""])
def test_int_options_refuse_what_is_not_an_integer(prog, name, command, param, value):
    assert _refused(command, name, param, value) is not None


@pytest.mark.parametrize("prog, name, command, param", list(_options(_is_int)))
def test_bounded_int_options_refuse_negative_and_huge(prog, name, command, param):
    if isinstance(param.type, click.IntRange) and param.type.min is not None and param.type.min >= 0:
        assert _refused(command, name, param, "-1") is not None
    if isinstance(param.type, click.IntRange) and param.type.max is not None:
        assert _refused(command, name, param, str(10 ** 30)) is not None


def _is_output(p):
    return p.name in OUTPUT_NAMES and isinstance(p.type, click.Path)


@pytest.mark.parametrize("prog, name, command, param", list(_options(_is_output)))
def test_output_paths_under_a_file_are_refused_before_the_work(prog, name, command, param, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    target = blocker / ("x.csv" if name == "predict" else "x.json")
    if param.name == "out" and name == "index":
        target = blocker / "dataset"
    assert _refused(command, name, param, str(target)) is not None


@pytest.mark.parametrize("args, option", [
    (["train", "--lr", "nan"], "--lr"), (["train", "--lr", "inf"], "--lr"), (["train", "--gamma", "nan"], "--gamma"),
    (["train", "--gamma", "-1"], "--gamma"), (["train", "--weight-decay", "nan"], "--weight-decay"),
    (["train", "--clip-grad", "nan"], "--clip-grad"), (["train", "--lr", "1e308"], "--lr"),
    (["train", "--warmup-epochs", "1e308"], "--warmup-epochs"), (["train", "--image-size", "1000000"], "--image-size"),
    (["predict", "--crop-pct", "nan"], "--crop-pct"), (["train", "--label-smoothing", "nan"], "--label-smoothing"),
])
def test_dynatrain_prints_one_line_exit_2_and_writes_nothing(args, option, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if args[0] == "predict":
        (tmp_path / "w.pt").write_bytes(b"")
        args = ["predict", "w.pt", str(tmp_path), "--out", "p.csv", *args[1:]]
    else:
        args = [*args, "--out", "run", "--shards", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        dynatrain_main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and option in err[0], err
    assert sorted(os.listdir(tmp_path)) == (["w.pt"] if args[0] == "predict" else [])


def _run_main(prog, args, capsys):
    """(exit code, stderr lines) of the console entry point, as a user runs it."""
    if prog == "dynatrain":
        with pytest.raises(SystemExit) as exc:
            dynatrain_main(args)
    else:
        with pytest.raises(SystemExit) as exc:
            dynaprep_group.main(args=args, prog_name="dynaprep")
    return exc.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("prog, name, command, param", list(_options(lambda p: _is_float(p) or _is_int(p))))
def test_every_number_option_through_the_console_entry_is_one_line_exit_2_nothing_written(
        prog, name, command, param, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for value in ("nan", "abc"):
        code, err = _run_main(prog, [name, param.opts[-1], value], capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("Error:") and param.opts[-1] in err[0], err
    assert os.listdir(tmp_path) == []


def test_dynaprep_index_refuses_bad_numbers_before_writing(tmp_path):
    from click.testing import CliRunner

    for option, value in (("--crop-pct", "nan"), ("--image-size", "1000000"), ("--max-file-bytes", "0"),
                          ("--crop-pct", "inf")):
        result = CliRunner().invoke(dynaprep_group, ["index", "--data", "demo", "--out", str(tmp_path / "out"),
                                                     option, value])
        assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output.splitlines()[-1]
        assert not (tmp_path / "out").exists()


def _parsed_by_callback(p):
    from dynavit.pipeline.cli_types import out_dir, out_file

    return p.callback is not None and p.callback not in (out_dir, out_file) and not isinstance(p.type, click.Path)


@pytest.mark.parametrize("prog, name, command, param", list(_options(_parsed_by_callback)))
@pytest.mark.parametrize("value", ["nan,abc", "-1", ""])
def test_options_parsed_by_a_callback_refuse_nonsense(prog, name, command, param, value):
    assert _refused(command, name, param, value) is not None


@pytest.mark.parametrize("prog, name, command, param", list(_options(lambda p: isinstance(p.type, click.Choice))))
def test_choice_options_refuse_other_values(prog, name, command, param):
    assert _refused(command, name, param, "nan") is not None
