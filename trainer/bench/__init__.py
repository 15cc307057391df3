"""Benchmarks: training throughput with the loader (`throughput`), the model step alone
(`step`), inference (`infer`), methods at matched MACs (`compare`), loader start against
sample count (`start`), scorers against each other (`scorers`), and `report`, which runs
them and writes docs/BENCHMARKS.md.

Each module owns its click command. Nothing in the product imports this package; only
trainer/cli.py registers the commands.
"""
