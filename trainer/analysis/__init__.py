"""Reading finished runs: `report` (curves, sweep table, confusion matrices) and `compare`
(methods at matched MACs, grouped over seeds).

May import: trainer's core, `methods`, `infer`, dynavit.pipeline.show, dynavit.manifests.
"""
