"""LIME for images: our own implementation of the algorithm of Ribeiro, Singh & Guestrin,
"Why Should I Trust You?" (KDD 2016), not the `lime` package.

For one image and one class c:
1. superpixels: SLIC segments (scikit-image; `superpixels`), or any integer label map;
2. `num_samples` binary vectors z ∈ {0,1}^M over the M superpixels, the first all ones; in
   the perturbed image a superpixel with z_j = 0 is replaced by its own mean colour (what
   `lime_image` does with hide_color=None);
3. y = the model's probability of c on each perturbed image;
4. weights π(z) = sqrt(exp(−d²/σ²)), d = the cosine distance between z and all-ones,
   σ = 0.25 (lime_image's defaults, kept so the numbers are comparable);
5. a weighted ridge regression y ≈ β·z + b (α = 1, the package's Ridge default); β_j is
   superpixel j's contribution. The top superpixels are those with the largest β.

`weighted_ridge` is the closed form, tested against numpy's lstsq on √w-scaled rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["Explanation", "weighted_ridge", "sample_masks", "lime_weights", "perturb", "explain_image",
           "superpixels", "top_mask", "patch_mask", "overlap"]


@dataclass(frozen=True)
class Explanation:
    label: int
    coef: np.ndarray        # [M] contribution of each superpixel
    intercept: float
    r2: float               # weighted R² of the local fit
    segments: np.ndarray    # [H, W] superpixel label map, labels 0..M-1


def weighted_ridge(X: np.ndarray, y: np.ndarray, w: np.ndarray, alpha: float = 1.0) -> tuple[np.ndarray, float]:
    """(β, b) minimising Σ w_i (y_i − X_i·β − b)² + α‖β‖² (the intercept is not penalised,
    as scikit-learn's Ridge with sample weights): centre X and y by their weighted means,
    then solve (Xcᵀ W Xc + αI) β = Xcᵀ W yc."""
    X, y, w = (np.asarray(a, dtype=np.float64) for a in (X, y, w))
    if X.ndim != 2 or y.shape != (X.shape[0],) or w.shape != y.shape or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weighted_ridge needs X [n, m], y [n] and weights [n] >= 0 with a positive sum")
    mx = w @ X / w.sum()
    my = float(w @ y / w.sum())
    Xc, yc = X - mx, y - my
    A = Xc.T @ (Xc * w[:, None]) + alpha * np.eye(X.shape[1])
    beta = np.linalg.solve(A, Xc.T @ (w * yc)) if alpha > 0 else np.linalg.lstsq(A, Xc.T @ (w * yc), rcond=None)[0]
    return beta, my - float(mx @ beta)


def sample_masks(m: int, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """[num_samples, m] of 0/1, the first row all ones (the image itself), as the package."""
    z = rng.integers(0, 2, size=(num_samples, m)).astype(np.uint8)
    z[0] = 1
    return z


def lime_weights(z: np.ndarray, kernel_width: float = 0.25) -> np.ndarray:
    """π(z) = sqrt(exp(−d²/σ²)), d = cosine distance to all-ones (1 for an all-zero z)."""
    z = np.asarray(z, dtype=np.float64)
    norm = np.sqrt(z.sum(1)) * np.sqrt(z.shape[1])
    cos = np.divide(z.sum(1), norm, out=np.zeros(len(z)), where=norm > 0)
    d = 1.0 - cos
    return np.sqrt(np.exp(-(d ** 2) / kernel_width ** 2))


def perturb(image: np.ndarray, segments: np.ndarray, z: np.ndarray) -> np.ndarray:
    """[n, H, W, C] images: superpixels with z = 0 replaced by their mean colour."""
    m = int(segments.max()) + 1
    flat = image.reshape(-1, image.shape[-1]).astype(np.float64)
    lab = segments.reshape(-1)
    means = np.stack([np.bincount(lab, flat[:, c], m) / np.maximum(np.bincount(lab, minlength=m), 1)
                      for c in range(flat.shape[1])], 1)
    fudged = means[lab].reshape(image.shape).round().astype(image.dtype)
    hide = (z[:, segments] == 0)[..., None]  # [n, H, W, 1]
    return np.where(hide, fudged[None], image[None])


def explain_image(predict: Callable[[np.ndarray], np.ndarray], image: np.ndarray, segments: np.ndarray,
                  label: int | None = None, num_samples: int = 500, seed: int = 0, batch: int = 50,
                  kernel_width: float = 0.25, alpha: float = 1.0) -> Explanation:
    """LIME of `predict` (uint8 [n,H,W,C] → probabilities [n, classes]) on one image; `label`
    defaults to the class predicted on the unperturbed image."""
    segments = np.asarray(segments)
    if segments.shape != image.shape[:2] or segments.min() < 0:
        raise ValueError(f"segments must be a label map of shape {image.shape[:2]} with labels >= 0")
    _, segments = np.unique(segments, return_inverse=True)
    segments = segments.reshape(image.shape[:2])
    z = sample_masks(int(segments.max()) + 1, num_samples, np.random.default_rng(seed))
    probs = np.concatenate([predict(perturb(image, segments, z[i:i + batch])) for i in range(0, len(z), batch)])
    label = int(np.argmax(probs[0])) if label is None else int(label)
    y, w = probs[:, label].astype(np.float64), lime_weights(z, kernel_width)
    beta, b = weighted_ridge(z, y, w, alpha)
    resid = y - z @ beta - b
    ybar = w @ y / w.sum()
    r2 = 1 - float(w @ resid ** 2) / max(float(w @ (y - ybar) ** 2), 1e-300)
    return Explanation(label, beta, b, r2, segments)


def superpixels(image: np.ndarray, n_segments: int = 50, compactness: float = 10.0) -> np.ndarray:
    """SLIC superpixels of an RGB uint8 image (scikit-image, imported here: an optional extra)."""
    try:
        from skimage.segmentation import slic
    except ImportError:
        raise RuntimeError("explain needs scikit-image for SLIC superpixels: pip install 'dynavit[bench]'") from None
    return slic(image, n_segments=n_segments, compactness=compactness, start_label=0)


def top_mask(exp: Explanation, top: int) -> np.ndarray:
    """Pixels of the `top` superpixels with the largest positive contribution."""
    order = [j for j in np.argsort(-exp.coef, kind="stable")[:top] if exp.coef[j] > 0]
    return np.isin(exp.segments, order)


def patch_mask(keep_idx, grid: tuple[int, int], patch: int) -> np.ndarray:
    """Pixels [Gh·P, Gw·P] of the kept patches (raster indices)."""
    m = np.zeros(grid[0] * grid[1], bool)
    m[np.asarray(keep_idx, dtype=np.int64)] = True
    return np.kron(m.reshape(grid), np.ones((patch, patch), bool)).astype(bool)


def overlap(explanation_mask: np.ndarray, kept_mask: np.ndarray) -> float:
    """Share of the explanation's pixels that lie in kept patches (NaN for an empty
    explanation). Chance level is the kept share of the image."""
    e = np.asarray(explanation_mask, bool)
    return float((e & kept_mask).sum() / e.sum()) if e.any() else float("nan")
