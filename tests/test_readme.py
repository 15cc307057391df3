"""README's quick start and Python snippet, run as written (a newcomer's first minutes)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

README = Path(__file__).resolve().parents[1] / "README.md"


def block(after_heading: str, lang: str) -> str:
    text = README.read_text()
    section = text[text.index(after_heading):]
    return re.search(rf"```{lang}\n(.*?)```", section, re.S).group(1)


def commands(script: str) -> list[list[str]]:
    joined = script.replace("\\\n", " ")
    lines = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [shlex.split(ln) for ln in lines if not ln.startswith(". ")]  # `. .venv/bin/activate`: PATH below


@pytest.mark.slow
def test_quick_start_runs_as_written(tmp_path, monkeypatch):
    """Each line's arguments go to the command's click group in this process (what the
    console scripts run; a subprocess per line cost ~15 s of imports each)."""
    from dynavit.pipeline.cli import main as dynaprep
    from dynavit.trainer.cli import cli as dynatrain

    mains = {"dynaprep": dynaprep, "dynatrain": dynatrain}
    cmds = commands(block("## Quick start", "bash"))
    assert [c[0] for c in cmds] == ["dynaprep"] * 3 + ["dynatrain"] * 4
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for cmd in cmds:
        r = runner.invoke(mains[cmd[0]], cmd[1:])
        assert r.exit_code == 0, (cmd, r.output[-3000:], r.exception)
    out = tmp_path / "out" / "quick"
    assert (out / "data" / "dataset.json").is_file() and (out / "show.png").stat().st_size > 1000
    assert (out / "k50" / "best.pt").is_file() and (out / "report" / "sweep.md").is_file()
    rows = (out / "preds.csv").read_text().splitlines()
    assert len(rows) == 2 and ",ok," in rows[1]  # one image, predicted


def test_python_snippet_runs_as_written(capsys):
    code = block("In Python, the same pruned model", "python")
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.strip() == "torch.Size([2, 1000]) 138"
