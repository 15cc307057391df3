"""dynatrain: training and using ViTs on the kept tokens of a dynaprep dataset.

The training core sits at this level and reads top to bottom from `cli.py`: `config` (one
dataclass of every option) -> `data` (the shard loader) -> `model` (a timm ViT and the
method's forward) -> `train` (the loop), with `runtime` (device, autocast, DDP), `rundir`
(the run folder), `selection` (K and scorer), `recipe`/`augment`/`mixing` (the general
training recipe). Rooms below it, each importing only downwards:

- `methods/`  the sparse forward and every token-reduction method with its budget matching
              and MAC counting; imports nothing else of the trainer.
- `infer/`    the trained model in use: on-the-fly scoring, predict, evaluate.
- `analysis/` report and compare over finished runs.
- `bench/`    benchmarks; nothing in the product imports them (cli.py registers their
              commands).
"""
