"""dynatrain on class-sorted shards learns as well as a plain shuffled in-memory loop.

The reference is independent of dynatrain's data path: images are read back with
webdataset's own reader, each epoch is a fresh `torch.randperm`, flips are torch's. Same
model, initial weights (same seed), optimizer, weight-decay groups and constant LR.
On class-sorted shards a stream that cannot mix them (turn 1: shard shuffle + buffer)
falls far below the reference; exact shuffled epochs must not.
"""
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
from tiny_dataset import color_image, make_tiny_dataset

MODEL = dict(img_size=16, patch_size=8, embed_dim=64, depth=2, num_heads=2)
N_CLASSES, EPOCHS, BATCH, LR, WD, SEED = 10, 2, 64, 2e-3, 0.05, 3
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def sorted_ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("sorted") / "ds"
    # Class blocks written in source order, shards of 400: each shard holds one of 10 classes,
    # and the split is 4x the 1000-sample buffer a streaming loader would mix in.
    make_tiny_dataset(out, splits=(("train", 4000), ("val", 300)), shard_size=400, n_classes=N_CLASSES,
                      class_sorted=True, image_size=16, patch=8, ks=(50,), image_fn=color_image)
    return out


def read_split(ds, split):
    images, labels = [], []
    for row in read_shards(ds).to_pylist():
        if row["split"] == split:
            for s in wds.WebDataset(str(resolve(ds, row["images"])), shardshuffle=False).decode("rgb8"):
                images.append(s["png"])
                labels.append(int(s["cls"]))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x, torch.tensor(labels)


def plain_loop(ds) -> float:
    xt, yt = read_split(ds, "train")
    xv, yv = read_split(ds, "val")
    torch.manual_seed(SEED)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=N_CLASSES, **MODEL)
    opt = torch.optim.AdamW(param_groups_weight_decay(model, WD, no_weight_decay_list=model.no_weight_decay()),
                            lr=LR, weight_decay=WD)
    gen = torch.Generator().manual_seed(SEED)
    best = 0.0
    for _ in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(yt), generator=gen)
        for i in range(0, len(perm) - BATCH + 1, BATCH):
            idx = perm[i:i + BATCH]
            x = xt[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            loss = F.cross_entropy(model(x), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            best = max(best, 100.0 * (model(xv).argmax(1) == yv).float().mean().item())
    return best


def test_dynatrain_on_class_sorted_shards_matches_a_plain_shuffled_loop(sorted_ds, tmp_path):
    torch.set_num_threads(1)
    reference = plain_loop(sorted_ds)
    assert reference >= 70, reference  # the task is learnable in this budget
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in ["--shards", sorted_ds, "--out", run, "--k", 100, "--model", "vit_tiny_patch16_224",
                               "--model-kwargs", json.dumps(MODEL), "--epochs", EPOCHS, "--batch-size", BATCH,
                               "--lr", LR, "--weight-decay", WD, "--sched", "step", "--step-epochs", 100,
                               "--workers", 0, "--seed", SEED]])
    assert exc.value.code == 0
    best = json.loads((run / "summary.json").read_text())["best_acc1"]
    assert best >= reference - 5, (best, reference)
