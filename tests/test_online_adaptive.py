"""Online adaptive K (trainer/infer/adaptive.py, DynaViT(k_rule=...), predict --k-rule): the
same rule as the loader's NumPy one, on scores computed on the device, run packed."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image

from dynavit.trainer.adaptive_k import adaptive_keep as np_keep
from dynavit.trainer.adaptive_k import parse_k_rule, rule_counts
from dynavit.trainer.cli_tools import predict_command
from dynavit.trainer.infer.adaptive import adaptive_keep
from dynavit.trainer.infer.online import DynaViT
from dynavit.trainer.infer.scoring import score
from dynavit.trainer.methods.sparse import sparse_forward

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def test_torch_rule_equals_numpy_rule():
    rng = np.random.default_rng(0)
    s = rng.gamma(0.6, size=(40, 6, 6))
    s[5] = 0
    rule = parse_k_rule("mass:0.7,floor=10,ceil=80")
    keep, counts = adaptive_keep(torch.from_numpy(s), rule)
    assert counts.tolist() == rule_counts(rule, s).tolist()
    for i in range(len(s)):
        assert keep[i, :counts[i]].tolist() == np_keep(rule, s[i]).tolist()


def test_dynavit_adaptive_equals_per_sample_sparse_forwards():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                            num_classes=4).eval()
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    pixels[2, :, :16] = 128  # half flat: fewer patches hold the mass
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).float().view(1, 3, 1, 1)) \
        / torch.tensor(STD).float().view(1, 3, 1, 1)
    rule = parse_k_rule("mass:0.6,floor=10")
    net = DynaViT(vit, scorer="contrast", k_rule=rule).eval()
    with torch.no_grad():
        got = net(x)
    # scores of the uint8 pixels (DynaViT recovers them from the normalised x)
    ref_scores = score(torch.from_numpy(pixels).permute(0, 3, 1, 2), 8, "contrast").double().numpy()
    keeps = [np_keep(rule, s) for s in ref_scores]
    assert net.last_counts.tolist() == [len(k) for k in keeps]
    assert len(set(net.last_counts.tolist())) > 1
    with torch.no_grad():
        want = torch.cat([sparse_forward(vit, x[i:i + 1], torch.from_numpy(k)[None]) for i, k in enumerate(keeps)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dynavit_refuses_uncalibrated_budget():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    with pytest.raises(ValueError, match="τ"):
        DynaViT(vit, k_rule=parse_k_rule("budget:25"))


def test_predict_k_rule_writes_kept(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                            num_classes=3)
    ckpt = tmp_path / "m.pt"
    torch.save(vit.state_dict(), ckpt)
    rng = np.random.default_rng(2)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "flat.png")
    args = [str(ckpt), str(tmp_path), "--model", "vit_tiny_patch16_224", "--model-kwargs",
            '{"depth": 1, "patch_size": 8}', "--image-size", "32", "--crop-pct", "1", "--scorer", "contrast"]
    out = tmp_path / "p.csv"
    r = CliRunner().invoke(predict_command, args + ["--out", str(out), "--k-rule", "mass:0.5,floor=25"])
    assert r.exit_code == 0, r.output
    rows = {row["path"].rsplit("/", 1)[-1]: row for row in csv.DictReader(open(out))}
    assert int(rows["flat.png"]["kept"]) == 4  # flat: the floor, 25 % of 16
    assert all(4 <= int(v["kept"]) <= 16 for v in rows.values())
    bad = CliRunner().invoke(predict_command, args + ["--out", str(tmp_path / "q.csv"), "--k-rule", "budget:25"])
    assert bad.exit_code == 2 and not (tmp_path / "q.csv").exists()


def test_bench_infer_adaptive_row():
    from dynavit.trainer.bench.infer import format_table, run_bench, synthetic_images
    from dynavit.trainer.infer.scoring import score as torch_score
    rule = parse_k_rule("mass:0.5,floor=10")
    res = run_bench("vit_tiny_patch16_224", batch=3, ks=[50], scorers=["contrast"], device="cpu", round_to=0,
                    reps=1, iters=1, warmup=0, latency=False, model_kwargs={"depth": 1, "img_size": 64},
                    k_rules=(rule,))
    row = next(r for r in res["rows"] if r["key"].startswith("adaptive-"))
    pixels = synthetic_images(3, 64, 64, seed=0)
    s = torch_score(torch.from_numpy(pixels).permute(0, 3, 1, 2), 16, "contrast").double().numpy()
    assert row["S"] == round(1 + rule_counts(rule, s).mean(), 1)
    assert "online adaptive (packed)" in format_table(res)
    bad = CliRunner().invoke(__import__("dynavit.trainer.bench.infer", fromlist=["x"]).bench_infer_command,
                             ["--k-rule", "budget:20"])
    assert bad.exit_code == 2
