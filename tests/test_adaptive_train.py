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
