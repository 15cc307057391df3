"""Recipe options (trainer/recipe.py): gradient accumulation against one big batch and a
plain PyTorch loop, EMA against its formula and across a resume, layer-wise LR decay
against BEiT's rule written out by hand, --drop-path, and every option recorded, restored
on --resume and independent of --workers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import webdataset as wds
from timm.optim import param_groups_weight_decay

from dynavit.manifests import read_shards, resolve
from dynavit.trainer.cli import main
from dynavit.trainer.config import TrainConfig
from dynavit.trainer.train import make_optimizer
from tiny_dataset import make_tiny_dataset
from tiny_vits import one_thread  # noqa: F401,E402 (autouse: this module on one intra-op thread)

MODEL = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
SEED, LR, WD = 7, 1e-3, 0.05
BASE = ["--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(MODEL), "--lr", str(LR), "--weight-decay", str(WD), "--sched", "step", "--step-epochs", "1000", "--seed", str(SEED),
        "--workers", "0"]  # last: the worker test replaces it


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "ds"
    make_tiny_dataset(out, splits=(("train", 64), ("val", 8)), shard_size=16)  # 8x8 grid, 4 classes
    return out


def run_cli(args) -> int:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code


def weights(run, name="model", file="last.pt"):
    return torch.load(run / file, map_location="cpu", weights_only=True)[name]


def assert_same(a, b, atol, rtol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=k)


def plain_big_batches(ds, batch: int, steps: int):
    """One epoch, `steps` steps of `batch` samples, in a plain loop: images read with
    webdataset, the dense timm forward, F.cross_entropy, AdamW with timm's wd groups."""
    images = []
    for row in read_shards(ds).to_pylist():
        if row["split"] == "train":
            images += [(s["png"], int(s["cls"]))
                       for s in wds.WebDataset(str(resolve(ds, row["images"])), shardshuffle=False).decode("rgb8")]
    x = torch.from_numpy(np.stack([im for im, _ in images])).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)) / torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    y = torch.tensor([label for _, label in images])
    torch.manual_seed(SEED)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=4, **MODEL)
    opt = torch.optim.AdamW(param_groups_weight_decay(model, WD, no_weight_decay_list=model.no_weight_decay()),
                            lr=LR, weight_decay=WD)
    # the epoch's order: dynatrain's documented permutation of (seed, epoch) over file order
    order = np.random.default_rng([SEED, 0]).permutation(len(y))
    model.train()
    for j in range(steps):
        idx = torch.from_numpy(order[j * batch:(j + 1) * batch])
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.state_dict()


def test_four_accumulated_steps_equal_one_step_at_four_times_the_batch(ds, tmp_path):
    common = ["--shards", ds, "--k", 100, "--hflip", 0, "--epochs", 1, *BASE]
    assert run_cli([*common, "--out", tmp_path / "accum", "--batch-size", 4, "--accum-steps", 4]) == 0
    assert run_cli([*common, "--out", tmp_path / "big", "--batch-size", 16]) == 0
    accum, big = weights(tmp_path / "accum"), weights(tmp_path / "big")
    reference = plain_big_batches(ds, 16, 4)
    assert_same(big, reference, atol=2e-5)
    assert_same(accum, big, atol=2e-5)
    assert_same(accum, reference, atol=2e-5)
    # and it moved: not the initial weights
    torch.manual_seed(SEED)
    fresh = timm.create_model("vit_tiny_patch16_224", num_classes=4, **MODEL).state_dict()
    assert (accum["head.weight"] - fresh["head.weight"]).abs().max() > 1e-4
    m = json.loads((tmp_path / "accum" / "metrics.jsonl").read_text().splitlines()[0])
    assert m["steps"] == 16 and m["train_images"] == 64


def test_accum_tail_is_not_read_and_too_many_accum_steps_is_refused(ds, tmp_path, capsys):
    # 64 samples / batch 8 = 8 batches; accum 3 -> 2 optimizer steps of 3 batches, 2 batches unread
    run = tmp_path / "tail"
    assert run_cli(["--shards", ds, "--k", 100, "--epochs", 1, *BASE, "--out", run, "--batch-size", 8,
                    "--accum-steps", 3]) == 0
    m = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert m["steps"] == 6 and m["train_images"] == 48
    assert run_cli(["--shards", ds, "--k", 100, "--epochs", 1, *BASE, "--out", tmp_path / "x",
                    "--batch-size", 8, "--accum-steps", 9]) == 2
    assert "--accum-steps" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_ema_is_the_formula_and_survives_resume(ds, tmp_path):
    """One optimizer step per epoch (batch 64): after epoch 1 the EMA is d·w0 + (1−d)·w1 with
    w0 the seeded initial weights and w1 last.pt's; a run resumed after epoch 1 ends with the
    EMA of an uninterrupted one."""
    d = 0.75
    common = ["--shards", ds, "--k", 50, "--batch-size", 64, *BASE, "--model-ema-decay", d]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_cli([*common, "--out", resumed, "--epochs", 1]) == 0
    torch.manual_seed(SEED)
    w0 = timm.create_model("vit_tiny_patch16_224", num_classes=4, **MODEL).state_dict()
    w1, ema = weights(resumed), weights(resumed, "model_ema")
    assert_same(ema, {k: d * w0[k] + (1 - d) * w1[k] for k in w0}, atol=1e-6, rtol=1e-6)
    assert weights(resumed, "model_ema", "best.pt").keys() == w0.keys()
    assert json.loads((resumed / "metrics.jsonl").read_text())["ema_acc1"] is not None

    assert run_cli(["--resume", resumed, "--epochs", 2]) == 0
    assert run_cli([*common, "--out", straight, "--epochs", 2]) == 0
    assert_same(weights(resumed, "model_ema"), weights(straight, "model_ema"), atol=1e-6)


def test_layer_decay_scales_each_parameter_as_beit(ds):
    depth, decay = MODEL["depth"], 0.5
    cfg = TrainConfig(lr=1e-3, weight_decay=WD, layer_decay=decay, warmup_epochs=1, epochs=3)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=4, **MODEL)
    opt, sched, _ = make_optimizer(cfg, vit, None, None, torch.device("cpu"), steps_per_epoch=4)

    def layer(name):  # timm's ViT grouping: embeddings 0, block i -> i+1, final norm with the last block, head D+1
        if name.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return depth if name.startswith("norm.") else depth + 1

    scale_of = {id(p): decay ** (depth + 1 - layer(n)) for n, p in vit.named_parameters()}
    for _ in range(6):  # through the warmup and after it: the ratios stay
        head_lr = max(g["lr"] for g in opt.param_groups)
        for g in opt.param_groups:
            for p in g["params"]:
                assert g["lr"] == pytest.approx(head_lr * scale_of[id(p)], rel=1e-12)
        opt.step()
        sched.step()
    assert sum(len(g["params"]) for g in opt.param_groups) == len(scale_of)
    assert {round(decay ** (depth + 1 - layer(n)), 6) for n, _ in vit.named_parameters()} == {0.125, 0.25, 0.5, 1.0}


def test_drop_path_is_timms_drop_path_rate_and_a_contradiction_is_refused(ds, tmp_path, capsys):
    from dynavit.trainer.model import build_model
    from dynavit.trainer.data import open_dataset
    cfg = TrainConfig(model="vit_tiny_patch16_224", model_kwargs=dict(MODEL), drop_path=0.2)
    vit = build_model(cfg, open_dataset(ds), (32, 32), print)
    want = timm.create_model("vit_tiny_patch16_224", drop_path_rate=0.2, **MODEL)
    assert [b.drop_path1.drop_prob for b in vit.blocks[1:]] == [b.drop_path1.drop_prob for b in want.blocks[1:]]
    assert vit.blocks[1].drop_path1.drop_prob == pytest.approx(0.2)
    kwargs = json.dumps({**MODEL, "drop_path_rate": 0.1})
    assert run_cli(["--shards", ds, "--k", 50, "--out", tmp_path / "x", "--model", "vit_tiny_patch16_224",
                    "--model-kwargs", kwargs, "--drop-path", 0.2]) == 2
    assert "--drop-path" in capsys.readouterr().err and not (tmp_path / "x").exists()


ALL = ["--hflip", 0.3, "--vflip", 0.4, "--trivial-color", "--color-jitter", "0.4,0.3,0.3,0.1", "--reprob", 0.5, "--remode", "pixel",
       "--model-ema-decay", 0.9, "--layer-decay", 0.8, "--accum-steps", 2, "--drop-path", 0.1,
       "--mixup", 0.8, "--cutmix", 1.0, "--mixup-prob", 0.9]


@pytest.mark.slow
def test_every_recipe_option_is_recorded_restored_and_worker_independent(ds, tmp_path):
    common = ["--shards", ds, "--k", 50, "--batch-size", 8, *BASE, *ALL]
    straight, resumed, workers = tmp_path / "straight", tmp_path / "resumed", tmp_path / "workers"
    assert run_cli([*common, "--out", straight, "--epochs", 2]) == 0
    config = json.loads((straight / "config.json").read_text())["config"]
    assert {k: config[k] for k in ("hflip", "vflip", "color_jitter", "reprob", "remode", "model_ema_decay",
                                   "layer_decay", "accum_steps", "drop_path")} == {
        "hflip": 0.3, "vflip": 0.4, "color_jitter": [0.4, 0.3, 0.3, 0.1], "reprob": 0.5, "remode": "pixel",
        "model_ema_decay": 0.9, "layer_decay": 0.8, "accum_steps": 2, "drop_path": 0.1}
    assert (config["mixup"], config["cutmix"], config["mixup_prob"], config["trivial_color"]) == (0.8, 1.0, 0.9, True)
    assert run_cli([*common, "--out", resumed, "--epochs", 1]) == 0
    assert run_cli(["--resume", resumed, "--epochs", 2]) == 0  # every option from config.json
    two_workers = ["--shards", ds, "--k", 50, "--batch-size", 8, *BASE[:-1], "2", *ALL]
    assert run_cli([*two_workers, "--out", workers, "--epochs", 2]) == 0
    for name in ("model", "model_ema"):
        assert_same(weights(resumed, name), weights(straight, name), atol=1e-6)
        assert_same(weights(workers, name), weights(straight, name), atol=1e-6)
    from dynavit.trainer.analysis.report import load_run, run_row
    assert run_row(load_run(straight))["recipe"] == ("hflip 0.3 · vflip 0.4 · trivial-color · jitter 0.4,0.3,0.3,0.1 · reprob 0.5 · "
                                                     "ema 0.9 · layer-decay 0.8 · accum 2 · drop-path 0.1 · mixup 0.8 · cutmix 1 · "
                                                     "mixup-prob 0.9")


@pytest.mark.parametrize("option,value", [("--hflip", "nan"), ("--vflip", "1.5"), ("--color-jitter", "0.4,0.4"),
                                          ("--color-jitter", "nan"), ("--color-jitter", "0.4,0.4,0.4,0.7"),
                                          ("--model-ema-decay", "1"), ("--layer-decay", "nan"),
                                          ("--accum-steps", "0"), ("--drop-path", "inf"), ("--mixup", "nan"),
                                          ("--cutmix", "-1"), ("--reprob", "-0.1"), ("--mixup-prob", "nan")])
def test_bad_recipe_values_exit_2_with_one_line_and_write_nothing(ds, tmp_path, capsys, option, value):
    run = tmp_path / "run"
    capsys.readouterr()
    assert run_cli(["--shards", ds, "--k", 50, "--out", run, *BASE, option, value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("Error:") and option in err, err
    assert not run.exists()


def test_resume_with_another_layer_decay_is_one_line_exit_2(ds, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(["--shards", ds, "--k", 50, "--batch-size", 32, *BASE, "--out", run, "--epochs", 1]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    capsys.readouterr()
    assert run_cli(["--resume", run, "--epochs", 2, "--layer-decay", 0.7]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("Error:") and "--layer-decay" in err[-1]
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before  # nothing rewritten
