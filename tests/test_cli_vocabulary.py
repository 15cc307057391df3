"""One CLI vocabulary (docs/CLI.md): every option of every dynaprep and dynatrain command is
checked against the table in docs/CLI.md, which this test reads (so the doc and the check
cannot drift apart)."""
from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from dynavit.pipeline.cli import main as dynaprep
from dynavit.pipeline.cli_types import AmpType, DeviceType, renamed
from dynavit.trainer.cli import cli as dynatrain

DOC = Path(__file__).resolve().parents[1] / "docs" / "CLI.md"


def vocabulary() -> dict[str, set[str]]:
    """{spelling: the spellings it replaces} from the first table of docs/CLI.md."""
    table = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[1].startswith("`--"):
            others = set(re.findall(r"`(--[\w-]+)`", cells[2]))
            table[cells[1].strip("`")] = others
    return table


# The spellings whose type is fixed, whatever the command (docs/CLI.md, fourth column).
def _int_at_least(n):
    return lambda t: isinstance(t, click.IntRange) and t.min is not None and t.min >= n


TYPES = {
    "--device": lambda t: isinstance(t, DeviceType),
    "--amp": lambda t: isinstance(t, AmpType),
    "--batch-size": _int_at_least(1),
    "--repeats": _int_at_least(1),
    "--image-size": _int_at_least(1),
    "--json": lambda t: isinstance(t, click.Path) and not t.dir_okay,
}


def commands(group: click.Group, prefix: str):
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from commands(cmd, f"{prefix} {name}")
        else:
            yield f"{prefix} {name}", cmd


def problems(groups: dict[str, click.Group]) -> list[str]:
    """Every visible option spelled another way than docs/CLI.md says, or of another type."""
    vocab = vocabulary()
    banned = {old: new for new, olds in vocab.items() for old in olds}
    found = []
    for root, group in groups.items():
        for where, cmd in commands(group, root):
            for p in cmd.params:
                if not isinstance(p, click.Option) or p.hidden:  # hidden: a deprecated alias
                    continue
                for opt in p.opts + p.secondary_opts:
                    if opt in banned:
                        found.append(f"{where}: {opt} is spelled {banned[opt]}")
                    check = TYPES.get(opt)
                    if check is not None and not check(p.type):
                        found.append(f"{where}: {opt} has type {p.type!r}")
    return found


def test_docs_table_lists_the_concepts():
    vocab = vocabulary()
    assert {"--batch-size", "--device", "--amp", "--json", "--repeats", "--scorer", "--workdir", "--image-size",
            "--out", "--shards"} <= set(vocab)
    assert "--batch" in vocab["--batch-size"] and "--precision" in vocab["--amp"]


def test_every_command_speaks_one_vocabulary():
    assert problems({"dynaprep": dynaprep, "dynatrain": dynatrain}) == []


def _planted(*decorators) -> click.Group:
    def cmd(**kw):
        pass
    for d in reversed(decorators):
        cmd = d(cmd)
    group = click.Group("planted")
    group.add_command(click.command("x")(cmd))
    return group


@pytest.mark.parametrize("option, message", [
    (click.option("--batch", type=int), "--batch is spelled --batch-size"),
    (click.option("--reps", type=int), "--reps is spelled --repeats"),
    (click.option("--device", type=click.Choice(["cpu", "cuda"])), "--device has type"),
    (click.option("--amp", type=click.Choice(["fp32", "bf16"])), "--amp has type"),
    (click.option("--json", type=click.Path()), "--json has type"),
])
def test_a_planted_second_spelling_or_type_fails(option, message):
    found = problems({"planted": _planted(option)})
    assert len(found) == 1 and message in found[0], found


def test_every_deprecated_alias_is_listed_in_the_docs():
    listed = {m for m in re.findall(r"^\| `(--[\w-]+)", DOC.read_text().split("## Spellings kept")[1], re.M)}
    hidden = {opt for _, group in (("p", dynaprep), ("t", dynatrain)) for _, cmd in commands(group, "")
              for p in cmd.params if isinstance(p, click.Option) and p.hidden for opt in p.opts}
    assert hidden and hidden <= listed, hidden - listed


def test_renamed_alias_warns_sets_the_new_option_and_refuses_both():
    @click.command()
    @renamed("--batch", "--batch-size", "batch_size", type=int)
    @click.option("--batch-size", type=int, default=32)
    def c(batch_size):
        click.echo(f"batch_size={batch_size}")

    r = CliRunner()
    res = r.invoke(c, ["--batch", "8"])
    assert res.exit_code == 0 and "batch_size=8" in res.stdout
    assert "warning: --batch is deprecated" in res.stderr
    res = r.invoke(c, [])
    assert res.exit_code == 0 and "batch_size=32" in res.stdout and res.stderr == ""
    res = r.invoke(c, ["--batch", "8", "--batch-size", "4"])
    assert res.exit_code == 2 and "give one of them" in res.output
    assert "--batch " not in r.invoke(c, ["--help"]).output


def test_device_type_is_one_type_with_one_set_of_values():
    r = CliRunner()

    @click.command()
    @click.option("--device", type=DeviceType(), default="auto")
    def c(device):
        click.echo(device)

    assert r.invoke(c, []).output.strip() in ("cpu", "cuda")
    assert r.invoke(c, ["--device", "cpu"]).output.strip() == "cpu"
    for bad in ("tpu", "cuda:x", "cpu:1"):
        res = r.invoke(c, ["--device", bad])
        assert res.exit_code == 2 and "is not a device" in res.output
    import torch
    if not torch.cuda.is_available():
        res = r.invoke(c, ["--device", "cuda"])
        assert res.exit_code == 2 and "CUDA is not available" in res.output
