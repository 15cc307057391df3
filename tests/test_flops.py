"""MAC counting and the analytic S-model (dynavit.trainer.methods.flops)."""

import json

import pytest
import torch
from click.testing import CliRunner
from timm.models.vision_transformer import VisionTransformer

from dynavit.trainer.methods.flops import (
    build_meta_model,
    closed_form_coeffs,
    closed_form_macs,
    count_macs,
    count_macs_breakdown,
    fit_analytic,
    flops_table,
    model_dims,
    seq_len,
)
from dynavit.trainer.cli_tools import flops_command

KS = [100, 90, 70, 60, 50, 30, 25, 1]


def tiny_vit(**kw):
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2,
                             num_classes=10, **kw)


@pytest.fixture(scope="module")
def vit_small_meta():
    return build_meta_model("vit_small_patch16_224")


def _check_closed_form(model):
    dims = model_dims(model)
    for k in KS:
        S = seq_len(k, dims["N"])
        exact = count_macs(model, k)
        cf = closed_form_macs(S=S, **dims)
        assert abs(exact - cf) <= 0.005 * exact, (k, exact, cf)


def test_closed_form_tiny_cpu():
    _check_closed_form(tiny_vit().eval())


def test_closed_form_vit_small_meta(vit_small_meta):
    _check_closed_form(vit_small_meta)


def test_cpu_count_equals_meta_count_and_sdpa_is_counted():
    # On CPU timm's fused attention is one SDPA op; on meta it decomposes to bmm's.
    torch.manual_seed(0)
    cpu = tiny_vit().eval()
    with torch.device("meta"):
        meta = tiny_vit()
    assert cpu.blocks[0].attn.fused_attn
    for k in (100, 50):
        a, b = count_macs_breakdown(cpu, k), count_macs_breakdown(meta, k)
        assert a == b
        assert a["attention"] == 2 * 2 * a["S"] ** 2 * 64  # depth·2·S²·D


def test_vit_base_matches_known_counts():
    rows, fit = flops_table("vit_base_patch16_224", [100, 70, 60])
    by_k = {r["K"]: r for r in rows}
    assert [by_k[k]["S"] for k in (100, 70, 60)] == [197, 138, 118]
    assert round(by_k[100]["gmacs"], 2) == 17.56 and round(by_k[70]["gmacs"], 2) == 12.19
    # The paper's S=119 figures: analytic 10.48 = exact count, tool 10.23 ~ no SDPA.
    a, b, c = closed_form_coeffs(**model_dims(build_meta_model("vit_base_patch16_224")))
    exact_119 = a * 119 ** 2 + b * 119 + c
    assert round(exact_119 / 1e9, 2) == 10.48
    assert round((exact_119 - 12 * 2 * 119 ** 2 * 768) / 1e9, 2) == 10.22


def test_monotone_in_k_and_linear_in_batch():
    m = tiny_vit().eval()
    macs = [count_macs(m, k) for k in sorted(KS)]
    assert macs == sorted(macs) and len(set(macs)) == len(macs)
    assert count_macs(m, 70, batch=3) == 3 * count_macs(m, 70)


def test_seq_len_definition():
    for n in (64, 196, 197, 576):
        for k in range(1, 101):
            assert seq_len(k, n) == 1 + max(1, k * n // 100)
    assert seq_len(60, 196) == 118 and seq_len(70, 196) == 138 and seq_len(100, 196) == 197
    m = tiny_vit(reg_tokens=4).eval()
    assert count_macs_breakdown(m, 50)["S"] == seq_len(50, 64, num_prefix=5) == 37


def test_fit_recovers_closed_form(vit_small_meta):
    rows, fit = flops_table(vit_small_meta, [100, 90, 70, 60, 50, 30, 25])
    assert fit["max_rel_err"] < 1e-9
    a, b, c = closed_form_coeffs(**model_dims(vit_small_meta))
    assert fit["alpha"] == pytest.approx(a, rel=1e-6)
    assert fit["beta"] == pytest.approx(b, rel=1e-6)
    assert fit["gamma"] == pytest.approx(c, rel=1e-6)
    assert all(r["rel_err"] < 1e-9 for r in rows)


def test_fit_needs_three_distinct_s():
    with pytest.raises(ValueError, match="3 distinct"):
        fit_analytic([10, 10, 20], [1.0, 1.0, 2.0])
    assert flops_table(tiny_vit(), [100, 50])[1] is None


def test_count_restores_training_mode():
    m = tiny_vit(patch_drop_rate=0.5).train()
    m.blocks[0].eval()
    assert count_macs_breakdown(m, 50)["S"] == 1 + 32  # patch dropout not applied
    assert m.training and not m.blocks[0].training and m.blocks[1].training


def test_cli_table_and_json(tmp_path):
    out = tmp_path / "f.json"
    r = CliRunner().invoke(flops_command, ["--model", "vit_tiny_patch16_224",
                                           "--k", "100,70,50,25", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "max rel err" in r.output and " 138 " in r.output
    doc = json.loads(out.read_text())
    assert [row["K"] for row in doc["rows"]] == [100, 70, 50, 25]
    assert doc["fit"]["max_rel_err"] < 1e-9


@pytest.mark.parametrize("args", [["--k", "0,50"], ["--k", "abc"], ["--k", "101"],
                                  ["--model", "no_such_model"], ["--model", "resnet18"]])
def test_cli_bad_arguments_exit_2_and_write_nothing(tmp_path, args):
    out = tmp_path / "f.json"
    r = CliRunner().invoke(flops_command, args + ["--json", str(out)])
    assert r.exit_code == 2, r.output
    assert not out.exists()


def test_bench_step_smoke(tmp_path):
    # bench_step reuses count_macs for its ideal speed-up column; keep it runnable.
    from dynavit.trainer.bench.step import bench_step_command as bench_main

    out = tmp_path / "b.json"
    r = CliRunner().invoke(bench_main, ["--batch-size", "1", "--k", "50", "--steps", "1",
                                        "--warmup", "0", "--repeats", "1", "--infer",
                                        "--json", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())["rows"]
    assert [row["K"] for row in rows] == ["dense", 50]
    assert rows[1]["S"] == 99 and rows[1]["ideal_speedup"] > 2


def test_flops_cli_prints_the_same_macs_on_cpu_and_meta_for_every_method(tmp_path):
    # The same figures whatever the device runs the counted forwards (with real random weights
    # on CPU, where timm's attention is a fused SDPA kernel; shapes only on meta).
    kwargs = json.dumps({"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 12, "num_heads": 2,
                         "num_classes": 7})
    docs, outs = {}, {}
    for device in ("cpu", "meta"):
        path = tmp_path / f"{device}.json"
        res = CliRunner().invoke(flops_command, ["--model", "vit_tiny_patch16_224", "--model-kwargs", kwargs,
                                                 "--k", "100,50", "--method", "all", "--device", device,
                                                 "--json", str(path)])
        assert res.exit_code == 0, res.output
        docs[device], outs[device] = json.loads(path.read_text()), res.output
    assert docs["cpu"].pop("device") == "cpu" and docs["meta"].pop("device") == "meta"
    assert docs["cpu"] == docs["meta"]
    assert outs["cpu"] == outs["meta"]
    assert {e["method"] for e in docs["cpu"]["learned"]} == {"dynamicvit", "tnt", "cropr", "svit"}
    assert all(r["attn_macs"] > 0 for r in docs["cpu"]["rows"])
