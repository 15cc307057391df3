"""Adaptive K through the loader, training and evaluation (issue 28), on a real class-sorted
set: scikit-image photo crops as an ImageFolder, indexed class by class (--order source).
Every kept set is checked against scores.npy read with tarfile and the rule written as a
plain loop (test_adaptive_k.ref_mass_count)."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("skimage")

from dynavit.manifests import k_count  # noqa: E402
from dynavit.pipeline.cli import main as dynaprep_main  # noqa: E402
from dynavit.pipeline.photo_data import photo_crops  # noqa: E402
from dynavit.trainer.adaptive_k import calibrate_budget, parse_k_rule  # noqa: E402
from dynavit.trainer.cli import main  # noqa: E402
from dynavit.trainer.data import build_loader, hflip_indices  # noqa: E402
from dynavit.trainer.infer.evaluate import evaluate_run  # noqa: E402
from dynavit.trainer.methods.packing import RaggedKeep  # noqa: E402
from test_adaptive_k import ref_mass_count  # noqa: E402

KW = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("adaptive")
    photo_crops(root / "src", 40, 20, size=32, seed=0)
    out = root / "ds"
    r = CliRunner().invoke(dynaprep_main, ["index", "--data", "imagefolder", "--src", str(root / "src"), "--out",
                                           str(out), "--k", "25", "--scorer", "contrast", "--image-size", "32",
                                           "--patch-size", "8", "--format", "png", "--order", "source",
                                           "--workers", "1", "--no-progress", "--shard-size", "16"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out


def stored_scores(ds, split) -> dict:
    """{key: scores [4, 4] float64} read with tarfile, independent of the trainer's reader."""
    out = {}
    for tar in sorted((ds / split).glob("topk-contrast-*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                if m.name.endswith(".scores.npy"):
                    out[m.name[:-len(".scores.npy")]] = np.load(io.BytesIO(t.extractfile(m).read())).astype(np.float64)
    return out


def ref_keep(s, tau, lo, hi):
    k = ref_mass_count(s, tau, lo, hi)
    flat = s.reshape(-1)
    return sorted(sorted(range(len(flat)), key=lambda j: (-flat[j], j))[:k])


def test_loader_keeps_the_rules_sets_flipped_with_the_image(dataset):
    scores = stored_scores(dataset, "train")
    labels_seen = []
    for hflip in (0.0, 1.0):
        loader = build_loader(dataset, "train", k_rule="mass:0.6,floor=25,ceil=75", scorer="contrast",
                              batch_size=8, hflip=hflip, seed=1)
        for batch in loader:
            assert isinstance(batch.keep_idx, RaggedKeep)
            for key, row, c in zip(batch.keys, batch.keep_idx.idx, batch.keep_idx.counts):
                want = ref_keep(scores[key], 0.6, k_count(25, 16), k_count(75, 16))
                if hflip:
                    want = hflip_indices(np.array(want), 4).tolist()
                assert row[:c].tolist() == want, key
            labels_seen += batch.labels.tolist()
    assert len(set(labels_seen)) == 10  # a global shuffle over the class-sorted shards


def test_budget_calibrated_on_the_split(dataset):
    scores = stored_scores(dataset, "val")
    loader = build_loader(dataset, "val", k_rule="budget:25", scorer="contrast", batch_size=16, train=False)
    counts = torch.cat([b.keep_idx.counts for b in loader]).numpy()
    rule, mean = calibrate_budget(parse_k_rule("budget:25"), np.stack(list(scores.values())))
    assert loader.plan.k_rule.tau == rule.tau
    assert counts.mean() == pytest.approx(mean) and abs(mean - k_count(25, 16)) < 0.1
    assert counts.min() < counts.max()  # adaptive


def test_train_and_evaluate_with_a_k_rule(dataset, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["--shards", str(dataset), "--k-rule", "mass:0.5,floor=10", "--scorer", "contrast", "--out", str(out),
              "--epochs", "1", "--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(KW),
              "--batch-size", "8", "--workers", "0", "--lr", "1e-3"])
    assert e.value.code == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    val = stored_scores(dataset, "val")
    want = {k: ref_mass_count(s, 0.5, k_count(10, 16), 16) for k, s in val.items()}
    assert record["eval_mean_kept"] == pytest.approx(np.mean(list(want.values())))
    res = evaluate_run(out, device="cpu")
    assert res["kept_per_sample"] == want  # recorded per sample
    assert res["acc1"] == pytest.approx(record["acc1"])  # the same computation as training's evaluation
    assert res["mean_gmacs"] == pytest.approx(record["eval_mean_gmacs"])
    with pytest.raises(SystemExit) as e:  # --k with --k-rule: one-line error, exit 2
        main(["--shards", str(dataset), "--k-rule", "mass:0.5", "--k", "25", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and not (tmp_path / "x").exists()


def test_compare_puts_adaptive_and_fixed_k_in_one_table(dataset, tmp_path):
    from dynavit.trainer.analysis.compare import compare_runs, write_compare
    from dynavit.trainer.methods.macs import count
    from dynavit.trainer.methods.sparse import sparse_forward
    import timm
    runs = []
    for name, sel in (("fixed", ["--k", "25"]), ("adaptive", ["--k-rule", "budget:25"])):
        with pytest.raises(SystemExit) as e:
            main(["--shards", str(dataset), *sel, "--scorer", "contrast", "--out", str(tmp_path / name),
                  "--epochs", "1", "--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(KW),
                  "--batch-size", "8", "--workers", "0"])
        assert e.value.code == 0
        runs.append(tmp_path / name)
    rows = compare_runs(runs, batch=4, steps=1, repeats=1)
    write_compare(rows, tmp_path / "cmp")
    fixed, adaptive = rows
    assert adaptive["method"] == "dynavit adaptive" and adaptive["parameter"].startswith("budget:25")
    # mean GMACs: each val image's own sparse forward, counted by our counter
    hist = json.loads((runs[1] / "metrics.jsonl").read_text().splitlines()[-1])["eval_kept_hist"]
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, **KW).eval()
    x = torch.zeros(1, 3, 32, 32)
    per = {int(c): count(lambda c=c: sparse_forward(vit, x, torch.arange(int(c))[None])).total for c in hist}
    n = sum(hist.values())
    assert adaptive["gmacs"] == pytest.approx(sum(per[int(c)] * f for c, f in hist.items()) / n / 1e9, rel=1e-12)
    assert sum(int(c) * f for c, f in hist.items()) / n == pytest.approx(4, abs=0.1)  # = k_count(25, 16)
    fixed_macs = count(lambda: sparse_forward(vit, x, torch.arange(4)[None])).total
    assert fixed["gmacs"] == pytest.approx(fixed_macs / 1e9, rel=1e-12)
    assert adaptive["gmacs"] >= fixed["gmacs"]  # same mean kept count; MACs are convex in S
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "dynavit adaptive" in table and "| dynavit | K=25" in table
