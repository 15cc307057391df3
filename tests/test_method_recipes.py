"""The methods' fine-tuning recipes (trainer/recipes.py) as dynatrain wires them:
optimizer groups, the backbone held during warm-up, the teacher, and the CLI's checks."""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F

from tiny_dataset import make_tiny_dataset

from dynavit.trainer.cli import main
from dynavit.trainer.config import TrainConfig
from dynavit.trainer.methods.dynamicvit import DynamicViTHeads, dynamicvit_forward
from dynavit.trainer.model import make_heads, teacher_outputs, training_loss
from dynavit.trainer.methods.recipes import FROM_SCRATCH, recipe_for
from dynavit.trainer.train import make_optimizer

KW = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2, num_classes=4)


def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **KW)


def groups_of(opt, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return [({names.get(id(p), "heads") for p in g["params"]}, g) for g in opt.param_groups]


def test_dynamicvit_recipe_groups_and_warmup_hold():
    m = vit()
    heads = make_heads(m, "dynamicvit", 4)
    cfg = TrainConfig(lr=1e-3, warmup_epochs=1.0, epochs=3, sched="cosine")
    opt, sched, _ = make_optimizer(cfg, m, heads, None, torch.device("cpu"), 10,
                                   recipe_for("dynamicvit", True), ["head.weight", "head.bias"])
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    # raoyongming/DynamicViT optim_factory.py: cls_token and pos_embed are not trained
    assert id(m.cls_token) not in in_opt and id(m.pos_embed) not in in_opt
    assert all(id(p) in in_opt for p in heads.parameters())
    lrs = {}
    for names, g in groups_of(opt, m):
        kind = "heads" if names == {"heads"} else ("head" if all(n.startswith("head.") for n in names) else "backbone")
        lrs.setdefault(kind, set()).add(g["lr"])
    # predictors at --lr, backbone at 0.01 x, a fresh classifier at --lr; all held at 0 or
    # warmed up at step 0 (LambdaLR has applied step 0's factor, 1/10)
    assert lrs["backbone"] == {0.0}
    assert len(lrs["heads"]) == 1 and lrs["heads"].pop() == pytest.approx(1e-4)
    assert len(lrs["head"]) == 1 and lrs["head"].pop() == pytest.approx(1e-4)
    for _ in range(10):  # the warm-up epoch ends: the backbone starts at 0.01 x the rate
        opt.step(), sched.step()
    for names, g in groups_of(opt, m):
        if names != {"heads"} and not all(n.startswith("head.") for n in names):
            assert g["lr"] == pytest.approx(1e-5)


def test_tnt_recipe_freezes_the_backbone_but_not_a_fresh_classifier():
    m = vit()
    heads = make_heads(m, "tnt", 4)
    opt, _, _ = make_optimizer(TrainConfig(lr=1e-3), m, heads, None, torch.device("cpu"), 10,
                               recipe_for("tnt", True), ["head.weight", "head.bias"])
    trained = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trained == {"head.weight", "head.bias"}
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(m.head.weight), id(m.head.bias)} | {id(p) for p in heads.parameters()}


def test_from_scratch_keeps_the_plain_grouping():
    m = vit()
    opt, _, _ = make_optimizer(TrainConfig(lr=1e-3), m, None, None, torch.device("cpu"), 10, FROM_SCRATCH)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))
    assert {g["lr"] for g in opt.param_groups} == {1e-3}
    assert recipe_for("dynamicvit", False) is FROM_SCRATCH


def test_dynamicvit_loss_with_teacher_is_the_authors_sum():
    """losses.py DistillDiffPruningLoss_dynamic (deit: clf 1, ratio 2 over the stage mean,
    distill 0.5 on the logit KL and 0.5 on the MSE of the kept tokens), written out."""
    student, teacher = vit().train(), vit().eval()
    heads = DynamicViTHeads.for_model(student)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    torch.manual_seed(1)
    logits, aux = dynamicvit_forward(student, heads, x, 0.7, training=True)
    t = teacher_outputs(teacher, x)
    got = training_loss("dynamicvit", 0.7, (logits, aux), y, F.cross_entropy, teacher=t)
    ratio = sum(((d.mean(1) - 0.7 ** s) ** 2).mean() for s, d in enumerate(aux["decisions"], 1)) / 3
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t[0], -1), reduction="batchmean", log_target=True)
    mask = aux["mask"].reshape(-1) > 0.5
    mse = (aux["tokens"].reshape(-1, 64)[mask] - t[1].reshape(-1, 64)[mask]).pow(2).mean()
    ref = F.cross_entropy(logits, y) + 2 * ratio + 0.5 * kl + 0.5 * mse
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    # --ratio-weight: the authors' --ratio_weight (5 for DeiT-B) scales only the ratio term
    got5 = training_loss("dynamicvit", 0.7, (logits, aux), y, F.cross_entropy, teacher=t, ratio_weight=5.0)
    assert got5.item() == pytest.approx((ref + 3 * ratio).item(), rel=1e-6)
    dense_logits = teacher(x)
    assert torch.allclose(t[0], dense_logits, atol=1e-6)  # the teacher is the dense forward


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "ds"
    make_tiny_dataset(out, splits=(("train", 16), ("val", 8)))
    return out


def test_cli_rejects_a_missing_teacher_and_a_negative_scale(dataset, tmp_path, capsys):
    base = ["--shards", str(dataset), "--k", "50", "--method", "dynamicvit", "--model", "vit_tiny_patch16_224",
            "--model-kwargs", json.dumps({k: v for k, v in KW.items() if k != "num_classes"}), "--workers", "0"]
    for extra, word in ((["--teacher", str(tmp_path / "nope")], "--teacher"),
                        (["--backbone-lr-scale", "-1"], "backbone-lr-scale"),
                        (["--ratio-weight", "-1"], "ratio-weight")):
        out = tmp_path / "run"
        with pytest.raises(SystemExit) as exc:
            main(base + ["--out", str(out)] + extra)
        assert exc.value.code == 2 and word in capsys.readouterr().err
        assert not out.exists()


def test_evit_keep_rate_warmup_from_scratch_follows_adjust_keep_rate():
    """youweiliang/evit 5ca95a7 helpers.py adjust_keep_rate with run_code.sh's 10 + 100 of 300
    epochs, as fractions of this run: 1 before, a half cosine from 1 to the final rate, then
    the final rate; the fine-tune recipe (finetune.sh) has none."""
    from dynavit.trainer.methods.recipes import keep_rate_at

    assert keep_rate_at(recipe_for("evit", True), 0.5, 300, 10) is None
    rate = keep_rate_at(recipe_for("evit", False), 0.5, 300, 10)
    assert [rate(s) for s in (0, 99)] == [1.0, 1.0]             # epochs 0..9
    assert rate(100) == pytest.approx(1.0)                       # cos(0): still 1
    assert rate(100 + 500) == pytest.approx(0.75)                # half way: (1 + 0.5) / 2
    assert rate(100 + 250) == pytest.approx(0.5 + 0.5 * (2 ** -0.5 + 1) / 2)
    assert rate(1100) == rate(2999) == 0.5                       # epoch >= 110
    seq = [rate(s) for s in range(0, 1200, 7)]
    assert all(a >= b for a, b in zip(seq, seq[1:]))


def test_dynatrain_evit_from_scratch_trains_through_the_schedule(dataset, tmp_path, monkeypatch):
    import dynavit.trainer.methods.evit as evit

    seen = []
    real = evit.evit_forward

    def spy(model, images, keep_rate, *a, **kw):
        if model.training:
            seen.append(keep_rate)
        return real(model, images, keep_rate, *a, **kw)

    monkeypatch.setattr(evit, "evit_forward", spy)
    kw = {k: v for k, v in KW.items() if k != "num_classes"}
    with pytest.raises(SystemExit) as exc:
        main(["--shards", str(dataset), "--k", "50", "--method", "evit", "--model", "vit_tiny_patch16_224",
              "--model-kwargs", json.dumps(kw), "--workers", "0", "--batch-size", "4", "--epochs", "3",
              "--out", str(tmp_path / "run")])
    assert exc.value.code == 0
    final = json.loads((tmp_path / "run" / "summary.json").read_text())["method_param"]
    final = float(final.split("=")[1].split()[0])
    assert len(seen) == 12 and seen[0] == 1.0 and seen[-1] < 1.0
    assert all(a >= b for a, b in zip(seen, seen[1:]))
    assert min(seen) >= final


def _cropr_cosine_scheduler(base, final, epochs, niter, warmup_epochs):
    """benbergner/cropr 2f8b624 cls/utils.py ``cosine_scheduler``, written out here in NumPy
    (linear warm-up by np.linspace, then final + (base − final)·(1 + cos(π·i/n))/2)."""
    import math

    import numpy as np

    w = math.ceil(warmup_epochs * niter)
    warm = np.linspace(0, base, w)
    warm[0] = warm[1]
    iters = np.arange(math.ceil(epochs * niter) - w)
    return np.concatenate((warm, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))))


def test_cropr_recipe_is_its_authors_schedule():
    """Fine-tuning Cropr takes its authors' schedule where the command line leaves it open:
    layer-wise lr decay 0.75 (block i of D at 0.75^(D-i), cls/utils.py param_groups_lrd), a
    warm-up over 5/50 of the epochs, then their cosine (min_lr 0 here) step for step; an
    explicit --layer-decay / --warmup-epochs wins, and from scratch nothing is taken."""
    from dynavit.trainer.methods.recipes import with_recipe_schedule

    m = vit()
    heads = make_heads(m, "cropr", 4)
    base = TrainConfig(lr=1e-3, epochs=20, sched="cosine", method="cropr")
    cfg, taken = with_recipe_schedule(base, recipe_for("cropr", True))
    assert taken == {"layer_decay": 0.75, "warmup_epochs": 2.0}
    assert with_recipe_schedule(base, recipe_for("cropr", False))[1] == {}
    assert with_recipe_schedule(TrainConfig(lr=1e-3, epochs=20, sched="cosine", layer_decay=0.9, warmup_epochs=1),
                                recipe_for("cropr", True))[1] == {}
    steps = 10
    opt, sched, _ = make_optimizer(cfg, m, heads, None, torch.device("cpu"), steps, recipe_for("cropr", True))
    depth = len(m.blocks)
    peak = {}  # each group's rate relative to --lr, read back at the end of warm-up
    lrs = []
    for step in range(cfg.epochs * steps):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step(), sched.step()
    at_peak = lrs[int(cfg.warmup_epochs * steps) - 1]
    for (names, g), lr in zip(groups_of(opt, m), at_peak):
        block = {int(n.split(".")[1]) for n in names if n.startswith("blocks.")}
        if block:
            (i,) = block
            peak[f"block{i}"] = lr / cfg.lr
        elif names == {"heads"}:
            peak["routers"] = lr / cfg.lr
    for i in range(depth):
        assert peak[f"block{i}"] == pytest.approx(0.75 ** (depth - i))
    assert peak["routers"] == pytest.approx(1.0)
    # the schedule of a full-rate group (the routers) against the authors' cosine_scheduler
    router = next(j for j, (names, _) in enumerate(groups_of(opt, m)) if names == {"heads"})
    ours = [row[router] for row in lrs]
    ref = _cropr_cosine_scheduler(cfg.lr, 0.0, cfg.epochs, steps, cfg.warmup_epochs)
    w = int(cfg.warmup_epochs * steps)
    assert ours[w:] == pytest.approx(list(ref[w:]), rel=1e-9, abs=1e-15)  # the cosine, step for step
    # the warm-up: linear to the peak at its last step (ours (s+1)/w, theirs linspace(0, peak, w))
    assert ours[w - 1] == pytest.approx(ref[w - 1]) and ours[0] == pytest.approx(cfg.lr / w)
