"""Which patches a run keeps: one `Selection`, resolved once from the dataset and the
arguments (like timm's `resolve_data_config`), then handed to the loader, the loop, flops,
bench and report.

"Dense" has one spelling here: `--select dense` and K = 100 both resolve to mode "dense".
"""
from __future__ import annotations

from dataclasses import dataclass

from dynavit.manifests import DatasetInfo, k_count

MODES = ("saliency", "random", "center", "dense")
# Where tokens are reduced: Dyna-ViT before the encoder (with a MODE); ToMe and EViT inside it
# without parameters; DynamicViT, TNT and Token Cropr inside it with learned heads.
METHODS = ("dynavit", "tome", "evit", "dynamicvit", "tnt", "cropr", "svit")
LEARNED = ("dynamicvit", "tnt", "cropr", "svit")
DENSE_K = 100


class SelectionError(ValueError):
    """The arguments ask for a selection the dataset cannot give; `param` names the option."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Selection:
    mode: str                 # saliency | random | center | dense
    k: int                    # percent of the window's patches kept (100 when dense)
    grid: tuple[int, int]     # patch grid of the stored image
    window: tuple[int, int]   # patch grid of the model input (== grid unless cropping)
    patch: int
    num_prefix: int = 1       # CLS (+ register) tokens of the model

    @property
    def dense(self) -> bool:
        return self.mode == "dense"

    @property
    def cropped(self) -> bool:
        return self.window != self.grid

    @property
    def num_patches(self) -> int:
        return self.window[0] * self.window[1]

    @property
    def kept(self) -> int | None:
        """Patches kept per sample; None when dense."""
        return None if self.dense else k_count(self.k, self.num_patches)

    @property
    def seq_len(self) -> int:
        return self.num_prefix + (self.num_patches if self.dense else self.kept)

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.window[0] * self.patch, self.window[1] * self.patch)


def resolve_selection(info: DatasetInfo, k: int | None, mode: str = "saliency", input_size: int | None = None,
                      num_prefix: int = 1, param: str = "--k") -> Selection:
    """The selection for K percent of `info`'s patches, or a one-line SelectionError.

    Stored kept-index sets exist only for the indexed Ks; random/center selection and a crop
    (which re-selects top-K from scores.npy) work for any K."""
    if mode not in MODES:
        raise SelectionError(f"unknown selection {mode!r}; choose from {', '.join(MODES)}", "--select")
    if mode == "dense" and k is None:
        k = DENSE_K
    if k is None:
        raise SelectionError(f"missing --k (the dataset has K = {info.k_values()}; 100 = dense)", param)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= DENSE_K:
        raise SelectionError(f"K must be an integer in 1..100, got {k!r}", param)
    if mode == "dense" and k != DENSE_K:
        raise SelectionError(f"--select dense keeps every patch, so K must be 100 (got {k})", param)
    if k == DENSE_K:
        mode = "dense"
    patch, (h, w) = info.patch_size, info.image_size
    if input_size is None:
        window = info.grid
    else:
        if input_size % patch or not patch <= input_size <= min(h, w):
            raise SelectionError(f"input size {input_size} must be a multiple of the patch size {patch} "
                                 f"and at most the stored size {h}x{w}", "--image-size")
        window = (input_size // patch, input_size // patch)
    if mode == "saliency" and window == info.grid and k not in info.k_values():
        ks = ", ".join(str(v) for v in info.k_values())
        raise SelectionError(f"K={k} was not indexed (available K: {ks}, or 100 for dense; any K works with "
                             f"--select random/center or an input size smaller than the stored {h}x{w})", param)
    return Selection(mode, k, info.grid, window, patch, num_prefix)
