"""Semantic segmentation on the dense features of any method (`dynatrain --task segment`).

`metrics` (confusion matrix, per-class IoU, mIoU), `head` (a 1×1 conv + bilinear upsample on
methods/dense.py's [B, Gh, Gw, D] map), `masks` (the KEY.mask.png members dynaprep wrote
into the image shards), `run` (train and evaluate). May import: torch, numpy, the trainer's
core (config, data, model, rundir) and methods/.
"""
