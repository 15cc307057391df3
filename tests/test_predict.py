"""`dynatrain predict` (issue 12): one row per input, failed rows for unreadable files,
probabilities equal to an independent dense / sparse forward, exit 2 with nothing written on
bad arguments."""
from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

timm = pytest.importorskip("timm")

from dynavit.pipeline.decode import load_image  # noqa: E402
from dynavit.pipeline.saliency import score_patches  # noqa: E402
from dynavit.pipeline.topk import select_topk  # noqa: E402
from dynavit.trainer.cli_tools import predict_command  # noqa: E402
from dynavit.trainer.infer.predict import predict  # noqa: E402
from dynavit.trainer.methods.sparse import sparse_forward  # noqa: E402

MODEL = "vit_tiny_patch16_224"
KW = {"depth": 2}
SIZE = 64
CLASSES = [f"class_{i}" for i in range(7)]
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def make_vit():
    torch.manual_seed(0)
    return timm.create_model(MODEL, pretrained=False, num_classes=len(CLASSES), img_size=SIZE, **KW).eval()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    vit = make_vit()
    ckpt = {"model": vit.state_dict(), "model_name": MODEL,
            "config": {"model": MODEL, "model_kwargs": KW}, "classes": CLASSES, "epoch": 1}
    torch.save(ckpt, root / "best.pt")
    torch.save(vit.state_dict(), root / "plain.pt")
    imgs = root / "imgs"
    (imgs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = [(100, 80), (64, 64), (300, 50), (40, 90), (65, 131)]
    good = []
    for i, (w, h) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w]
        a = np.stack([(xx * (i + 1) * 3 + yy * c) % 256 for c in range(3)], -1).astype(np.float64)
        a = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
        p = imgs / ("sub" if i % 2 else "") / f"im{i}.jpg"
        Image.fromarray(a).save(p, quality=90)
        good.append(p)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(buf, "PNG")
    (imgs / "broken.jpg").write_bytes(good[0].read_bytes()[:200])
    (imgs / "empty.jpg").write_bytes(b"")
    (imgs / "sub" / "tiny.png").write_bytes(buf.getvalue())
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(imgs / "too_small.png")  # < one patch
    (imgs / "notes.txt").write_text("not an image, and not an image extension")
    return {"root": root, "imgs": imgs, "good": sorted(good + [imgs / "sub" / "tiny.png"]),
            "bad": {"broken.jpg", "empty.jpg", "too_small.png"}}


def reference_probs(paths, k=100, scorer="l2"):
    """Independent: decode, normalize in numpy, timm's dense forward (K=100) or sparse_forward
    with select_topk of the Numba scores."""
    vit = make_vit()
    rgb = np.stack([load_image(p.read_bytes(), SIZE, policy="center-crop", crop_pct=0.875, patch_size=16).rgb
                    for p in paths])
    x = torch.from_numpy(((rgb / 255.0 - MEAN) / STD).astype(np.float32)).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        if k == 100:
            logits = vit(x)
        else:
            idx = torch.from_numpy(select_topk(score_patches(rgb, 16, scorer), k).astype(np.int64))
            logits = sparse_forward(vit, x, idx)
    return torch.softmax(logits, -1).numpy()


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("k,scorer", [(100, "l2"), (50, "entropy")])
def test_predict_command_csv(workdir, k, scorer):
    out = workdir["root"] / f"preds-{k}.csv"
    res = CliRunner().invoke(predict_command, [str(workdir["root"] / "best.pt"), str(workdir["imgs"]),
                                               "--out", str(out), "--k", str(k), "--scorer", scorer,
                                               "--device", "cpu", "--batch-size", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    rows = read_csv(out)
    names = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
    # one row per image-extension file, in sorted walk order; .txt skipped
    assert len(rows) == len(workdir["good"]) + len(workdir["bad"])
    assert "notes.txt" not in names
    for bad in workdir["bad"]:
        assert names[bad]["status"] == "failed" and names[bad]["error"], names[bad]
        assert names[bad]["top1_index"] == ""
    assert "empty" in names["empty.jpg"]["error"]
    assert "too small" in names["too_small.png"]["error"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert [r["path"] for r in ok] == [str(p) for p in workdir["good"]]
    ref = reference_probs(workdir["good"], k, scorer)
    for r, pr in zip(ok, ref):
        order = np.argsort(-pr, kind="stable")[:5]
        got_idx = [int(r[f"top{i}_index"]) for i in range(1, 6)]
        got_p = np.array([float(r[f"top{i}_prob"]) for i in range(1, 6)])
        assert got_idx == order.tolist()
        np.testing.assert_allclose(got_p, pr[order], rtol=1e-5, atol=1e-6)
        assert [r[f"top{i}_name"] for i in range(1, 6)] == [CLASSES[j] for j in order]
        assert r["error"] == ""
    assert names["im2.jpg"]["orig_width"] == "300" and names["im2.jpg"]["orig_height"] == "50"
    assert "predict:" in res.output and "failed" in res.output


def test_predict_plain_state_dict_parquet(workdir):
    pq = pytest.importorskip("pyarrow.parquet")
    out = workdir["root"] / "plain.parquet"
    files = [str(p) for p in workdir["good"][:3]] + [str(workdir["imgs"] / "broken.jpg")]
    res = CliRunner().invoke(predict_command, [str(workdir["root"] / "plain.pt"), *files,
                                               "--model", MODEL, "--model-kwargs", '{"depth": 2}',
                                               "--out", str(out), "--device", "cpu", "--top", "3"])
    assert res.exit_code == 0, res.output
    t = pq.read_table(out).to_pylist()
    assert [r["path"] for r in t] == files  # explicit files keep the given order
    assert [r["status"] for r in t] == ["ok"] * 3 + ["failed"]
    assert "top4_index" not in t[0] and t[0]["top1_name"] is None  # no class names in a state_dict
    ref = reference_probs(workdir["good"][:3])
    for r, pr in zip(t, ref):
        assert r["top1_index"] == int(np.argmax(pr))
        assert abs(r["top1_prob"] - pr.max()) < 1e-5


def test_predict_library_function(workdir):
    vit = make_vit()
    rows = predict(vit, [workdir["imgs"]], k=25, scorer="sobel", batch_size=3, classes=CLASSES)
    assert len(rows) == len(workdir["good"]) + len(workdir["bad"])
    assert sum(r["status"] == "ok" for r in rows) == len(workdir["good"])
    ok = [r for r in rows if r["status"] == "ok"]
    ref = reference_probs(workdir["good"], 25, "sobel")
    # sobel scores match the Numba ones to ~1e-6, so the selections (and probabilities) agree
    # unless a K-boundary near-tie flips one patch
    agree = sum(abs(r["top1_prob"] - pr.max()) < 1e-5 for r, pr in zip(ok, ref))
    assert agree >= len(ok) - 1


BAD_ARGS = [
    (["--k", "0"], "--k"),
    (["--k", "101"], "--k"),
    (["--scorer", "fft"], "--scorer"),
    (["--batch-size", "0"], "--batch-size"),
    (["--top", "0"], "--top"),
    (["--out-ext"], "out"),  # replaced below by a .txt --out
    (["--device", "cuda:7"], "--device"),
    (["--device", "tpu"], "--device"),
    (["--image-size", "96"], "CHECKPOINT"),   # pos_embed grid does not fit
    (["--model", "no_such_model_xyz"], "CHECKPOINT"),
    (["--mean", "1,2"], "--mean"),
    (["--model-kwargs", "[1]"], "--model-kwargs"),
]


@pytest.mark.parametrize("extra,hint", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_arguments_exit_2_nothing_written(workdir, tmp_path, extra, hint):
    out = tmp_path / "out" / "preds.csv"
    if extra == ["--out-ext"]:
        out, extra = tmp_path / "out" / "preds.txt", []
    res = CliRunner().invoke(predict_command, [str(workdir["root"] / "best.pt"), str(workdir["imgs"]),
                                               "--out", str(out), *extra])
    assert res.exit_code == 2, res.output
    err = [ln for ln in res.output.splitlines() if ln.startswith("Error")]
    assert len(err) == 1 and hint.lstrip("-").lower() in err[0].lower(), res.output
    assert not out.exists() and not out.parent.exists()


def test_bad_checkpoints_and_paths(workdir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "p.csv"
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    cases = [
        ([str(junk), str(workdir["imgs"])], "cannot read checkpoint"),
        ([str(workdir["root"] / "plain.pt"), str(workdir["imgs"])], "--model"),
        ([str(workdir["root"] / "plain.pt"), str(workdir["imgs"]), "--model", MODEL], "missing keys"),
        ([str(workdir["root"] / "best.pt"), str(tmp_path / "nope")], "does not exist"),
        ([str(workdir["root"] / "best.pt"), str(tmp_path)], "no images found"),
    ]
    for args, msg in cases:
        res = runner.invoke(predict_command, [*args, "--out", str(out)])
        assert res.exit_code == 2, (args, res.output)
        assert msg in res.output, res.output
        assert not out.exists()
    # an existing --out is kept unless --overwrite
    out.write_text("keep me")
    res = runner.invoke(predict_command, [str(workdir["root"] / "best.pt"), str(workdir["good"][0]),
                                          "--out", str(out)])
    assert res.exit_code == 2 and out.read_text() == "keep me"
    res = runner.invoke(predict_command, [str(workdir["root"] / "best.pt"), str(workdir["good"][0]),
                                          "--out", str(out), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert len(read_csv(out)) == 1
    assert not list(tmp_path.glob(".p.csv.*"))  # no temp file left behind


def test_a_run_folder_predicts_at_the_runs_k(workdir, tmp_path):
    """`predict RUN` reads RUN/best.pt and, for a Dyna-ViT run, its eval K (here 50, with the
    run's scorer): the probabilities of the sparse forward at K = 50, not of the dense model."""
    run = tmp_path / "k50"
    run.mkdir()
    vit = make_vit()
    torch.save({"model": vit.state_dict(), "model_name": MODEL, "classes": CLASSES, "epoch": 1,
                "config": {"model": MODEL, "model_kwargs": KW, "method": "dynavit", "k": 50, "scorer": "entropy"}},
               run / "best.pt")
    out = tmp_path / "p.csv"
    res = CliRunner().invoke(predict_command, [str(run), *map(str, workdir["good"][:3]), "--out", str(out),
                                               "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "K=50 entropy" in res.output
    ref = reference_probs(workdir["good"][:3], 50, "entropy")
    for r, pr in zip(read_csv(out), ref):
        np.testing.assert_allclose(float(r["top1_prob"]), pr.max(), rtol=1e-5, atol=1e-6)
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    res = CliRunner().invoke(predict_command, [str(empty), str(workdir["good"][0]), "--out", str(tmp_path / "q.csv")])
    assert res.exit_code == 2 and "without best.pt" in res.output and not (tmp_path / "q.csv").exists()
