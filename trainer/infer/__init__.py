"""The trained, pruned model in use: scoring patches on the device (`scoring`), the
Dyna-ViT module that scores and prunes on the fly (`online`), `predict` on image files and
`evaluate` on a dataset split.

May import: trainer's core (config, data, model, runtime, rundir, selection), `methods`,
dynavit.pipeline (decoding), dynavit.manifests.
"""
