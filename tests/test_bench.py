"""`dynatrain bench` on a tiny dataset: the figures it reports must be consistent with their sources."""
import tarfile

import pytest
from click.testing import CliRunner

from dynavit.manifests import k_count, read_shards
from dynavit.trainer.bench.throughput import _decode_tar, format_bench, run_bench
from dynavit.trainer.cli import cli
from dynavit.trainer.methods.flops import build_meta_model, count_macs
from tiny_dataset import make_tiny_dataset

TINY = {"patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "ds"
    make_tiny_dataset(out, splits=(("train", 64), ("val", 8)), ks=(50, 25), shard_size=16)
    return out


def test_decode_floor_decodes_every_image(tiny):
    for row in read_shards(tiny).to_pylist():
        with tarfile.open(tiny / row["images"]) as tar:
            n_png = sum(m.name.endswith(".png") for m in tar.getmembers())
        assert _decode_tar(str(tiny / row["images"])) == n_png == row["count"]


@pytest.mark.slow
def test_run_bench_rows_match_exact_mac_counts(tiny):
    r = run_bench(tiny, "vit_tiny_patch16_224", TINY, [100, 50, 25], batch=8, steps=1, repeats=1, amp="off",
                  device="cpu", worker_counts=[0], scorer="l2")
    meta = build_meta_model("vit_tiny_patch16_224", img_size=32, num_classes=4, **TINY)
    dense = count_macs(meta, 100)
    for name in ("train_step", "inference"):
        rows = {row["K"]: row for row in r[name]}
        assert set(rows) == {"dense", 50, 25}
        for k in (50, 25):
            assert rows[k]["S"] == 1 + k_count(k, 64)
            assert rows[k]["ideal_speedup"] == pytest.approx(dense / count_macs(meta, k))
            assert rows[k]["speedup"] == pytest.approx(rows[k]["imgs_per_s"] / rows["dense"]["imgs_per_s"])
    (loader,) = r["loader"]
    assert loader["ratio"] == pytest.approx(loader["loader_img_s"] / loader["floor_img_s"])
    assert [x["K"] for x in r["real_steps"]] == [100, 50, 25]
    text = format_bench(r)
    assert "loader alone at K=25" in text and "train step" in text


def test_bench_rejects_bad_k(tiny):
    result = CliRunner().invoke(cli, ["bench", "--shards", str(tiny), "--k", "0,50"])
    assert result.exit_code == 2 and "1..100" in result.output
