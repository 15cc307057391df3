"""Token-reduction forwards over an unmodified timm ViT, and how their compute is matched.

`sparse` is Dyna-ViT's gather-based forward (pruning before the encoder); `tome`, `evit`,
`dynamicvit`, `tnt`, `cropr` and `svit` are the compared methods, each exact to its authors' code
(tests/golden); `learned` holds what the learned ones share (their extra heads), `tokens`
the ViT stem and attention pieces they share, `recipes` each method's authors' training
recipe. `dense` gives every method's [B, Gh, Gw, D] patch map (dense tasks). `macs` is our MAC counter, `flops` the closed form and counts per K, `budget`
matches each method's parameter to Dyna-ViT's exact MACs at K.

May import: torch, timm, dynavit.manifests. Nothing else of dynavit.
"""
