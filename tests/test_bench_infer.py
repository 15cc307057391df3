"""Smoke test of the online inference benchmark (issue 12) on a tiny ViT."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

pytest.importorskip("timm")

from dynavit.trainer.bench.infer import format_table, run_bench  # noqa: E402
from dynavit.trainer.bench.infer import bench_infer_command as main  # noqa: E402


def test_run_bench_rows_and_table():
    res = run_bench("vit_tiny_patch16_224", batch=2, ks=[100, 50], scorers=["l2", "entropy"],
                    device="cpu", round_to=8, reps=1, iters=1, warmup=0,
                    model_kwargs={"depth": 1, "img_size": 64})
    rows = {(r["batch"], r["key"]): r for r in res["rows"]}
    n = res["meta"]["n_patches"]
    assert n == 16
    # dense, K=100 online (no rounding: S=17 cannot grow), K=50 idx/online/select with and without S↑8
    assert rows[(2, "dense")]["S"] == 17
    assert rows[(2, "idx-50-None")]["S"] == 9 and rows[(2, "idx-50-8")]["S"] == 16
    assert rows[(2, "online-50-entropy-8")]["S"] == 16
    assert (2, "online-100-l2-8") not in rows  # rounding changes nothing at K=100
    assert (1, "online-50-l2-None") in rows and (1, "select-50-l2-None") not in rows
    assert all(r["seconds"] > 0 for r in res["rows"])
    table = format_table(res)
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| K | path")
    body = lines[1:]
    assert len(body) == 1 + 2 + 2 * (1 + 2)  # dense, K100 online x2, K50 (idx + 2 online) x2
    assert body[0].split("|")[6].strip() == "1.00"  # dense vs itself


def test_cli_bad_arguments_exit_2():
    runner = CliRunner()
    for args in (["--k", "0"], ["--k", "a,b"], ["--scorer", "fft"], ["--model-kwargs", "[1]"],
                 ["--batch-size", "0"]):
        res = runner.invoke(main, args)
        assert res.exit_code == 2, (args, res.output)
        assert sum(ln.startswith("Error") for ln in res.output.splitlines()) == 1
