"""dynaprep benchmarks and profiles: `index` (dynaprep index against the bare decode floor),
`kernels` (the Numba saliency kernels), `profile` (where index time goes).

Nothing in the product imports this package; only pipeline/cli.py registers the
bench-index command.
"""
