"""Our own MAC counter: every matmul-class aten op counted by its formula from input shapes.

Why not ``torch.utils.flop_counter.FlopCounterMode``: its op registry changes between torch
releases, and with it our figures. torch 2.14.1 counted the CPU attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``) as 0 FLOPs while the meta device, which
decomposes attention into ``bmm``'s, counted it: the same model had two MAC counts, and budget
matching picked another ToMe r on CPU than on meta. Here the formulas are ours, the same for
every device and version, and an op that does matmul-class work but has no formula is an
error (``UncountedOpError``), never a silent 0.

Conventions (as every MAC table): one multiply-add = 1 MAC; counted are matmuls (mm, addmm,
bmm, baddbmm, linear, matmul, ...), convolutions and attention (QKᵀ and AV: B·H·L·S·(E + Ev)
for every scaled-dot-product variant, causal or not, so that the fused kernels count what the
math path's two bmm's count); not counted: norms, softmax, GELU, adds, sorts, gathers.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["MacCounter", "UncountedOpError", "is_matmul_class", "FORMULAS", "ATTENTION_OPS", "count",
           "count_on_zero_images"]


class UncountedOpError(RuntimeError):
    """A matmul-class op ran under ``MacCounter`` and has no formula here."""


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


def _mm(a, b, *_, **__) -> int:
    return int(a.shape[0]) * int(a.shape[1]) * int(b.shape[-1])


def _addmm(_c, a, b, *_, **__) -> int:
    return _mm(a, b)


def _bmm(a, b, *_, **__) -> int:
    return int(a.shape[0]) * int(a.shape[1]) * int(a.shape[2]) * int(b.shape[2])


def _baddbmm(_c, a, b, *_, **__) -> int:
    return _bmm(a, b)


def _mv(a, v, *_, **__) -> int:
    return int(a.shape[0]) * int(a.shape[1])


def _addmv(_c, a, v, *_, **__) -> int:
    return _mv(a, v)


def _dot(a, b, *_, **__) -> int:
    return int(a.numel())


def _addr(_c, u, v, *_, **__) -> int:
    return int(u.numel()) * int(v.numel())


def _linear(x, w, *_, **__) -> int:
    return _numel(x.shape[:-1]) * int(w.shape[0]) * int(w.shape[1])


def _matmul(a, b, *_, **__) -> int:
    # torch.matmul's broadcasting rules, from the shapes alone
    if a.dim() == 1 and b.dim() == 1:
        return int(a.shape[0])
    sa = a.shape if a.dim() > 1 else (1, a.shape[0])
    sb = b.shape if b.dim() > 1 else (b.shape[0], 1)
    batch = torch.broadcast_shapes(tuple(sa[:-2]), tuple(sb[:-2]))
    return _numel(batch) * int(sa[-2]) * int(sa[-1]) * int(sb[-1])


def _conv(x, w, _bias=None, _stride=None, _padding=None, _dilation=None, transposed=False,
          *_, _result=None, **__) -> int:
    # weight [Cout, Cin/g, *k] (transposed: [Cin, Cout/g, *k]): every output position of every
    # output channel takes Cin/g·prod(k) MACs; a transposed conv scatters every input position.
    spatial = x.shape[2:] if transposed else _result.shape[2:]
    return int(x.shape[0]) * _numel(spatial) * int(w.numel())


def _conv_plain(x, w, *_, _result=None, **__) -> int:
    return _conv(x, w, _result=_result)


def _conv_transposed(x, w, *_, _result=None, **__) -> int:
    return _conv(x, w, transposed=True, _result=_result)


def _sdpa_bhle(q, k, v, *_, **__) -> int:
    # q [..., Hq, L, E], k [..., Hk, S, E], v [..., Hk, S, Ev]; grouped-query heads broadcast
    # to q's heads. QKᵀ: L·S·E, AV: L·S·Ev per (batch, head).
    L, E = int(q.shape[-2]), int(q.shape[-1])
    S, Ev = int(k.shape[-2]), int(v.shape[-1])
    return _numel(q.shape[:-2]) * L * S * (E + Ev)


def _sdpa_blhe(q, k, v, *_, **__) -> int:
    # the low-level kernels' layout: q [B, L, H, E], k [B, S, Hk, E], v [B, S, Hk, Ev]
    if q.dim() != 4:
        raise UncountedOpError("variable-length (packed 3-D) attention inputs are not counted")
    B, L, H, E = (int(s) for s in q.shape)
    S, Ev = int(k.shape[1]), int(v.shape[-1])
    return B * H * L * S * (E + Ev)


#: attention kernels torch may dispatch ``F.scaled_dot_product_attention`` to (and the
#: composite names, should a mode ever see them undecomposed)
ATTENTION_OPS: dict[str, Callable[..., int]] = {
    "scaled_dot_product_attention": _sdpa_bhle,
    "_scaled_dot_product_attention_math": _sdpa_bhle,
    "_scaled_dot_product_attention_math_for_mps": _sdpa_bhle,
    "_scaled_dot_product_flash_attention": _sdpa_bhle,
    "_scaled_dot_product_flash_attention_for_cpu": _sdpa_bhle,
    "_scaled_dot_product_efficient_attention": _sdpa_bhle,
    "_scaled_dot_product_cudnn_attention": _sdpa_bhle,
    "_scaled_dot_product_fused_attention_overrideable": _sdpa_bhle,
    "_flash_attention_forward": _sdpa_blhe,
    "_efficient_attention_forward": _sdpa_blhe,
    "_cudnn_attention_forward": _sdpa_bhle,
}

#: op name (aten overload packet, without the overload) -> MACs from the op's arguments
FORMULAS: dict[str, Callable[..., int]] = {
    "mm": _mm, "_int_mm": _mm, "_scaled_mm": _mm, "_scaled_mm_v2": _mm, "_sparse_mm": _mm,
    "addmm": _addmm, "addmm_": _addmm, "_addmm_activation": _addmm,
    "bmm": _bmm, "baddbmm": _baddbmm, "baddbmm_": _baddbmm,
    "addbmm": _baddbmm, "addbmm_": _baddbmm,
    "mv": _mv, "addmv": _addmv, "addmv_": _addmv,
    "dot": _dot, "vdot": _dot, "inner": _dot,
    "addr": _addr, "addr_": _addr, "outer": lambda u, v, *_, **__: _addr(None, u, v),
    "ger": lambda u, v, *_, **__: _addr(None, u, v),
    "linear": _linear, "mkldnn_linear": _linear, "matmul": _matmul, "linalg_matmul": _matmul,
    "convolution": _conv, "_convolution": _conv, "convolution_overrideable": _conv,
    "conv1d": _conv_plain, "conv2d": _conv_plain, "conv3d": _conv_plain,
    "cudnn_convolution": _conv_plain, "mkldnn_convolution": _conv_plain,
    "miopen_convolution": _conv_plain, "_mps_convolution": _conv_plain,
    "_nnpack_spatial_convolution": _conv_plain, "thnn_conv2d": _conv_plain,
    "_slow_conv2d_forward": _conv_plain, "slow_conv3d": _conv_plain,
    "slow_conv3d_forward": _conv_plain, "_conv_depthwise2d": _conv_plain,
    "conv_depthwise3d": _conv_plain,
    "conv_transpose1d": _conv_transposed, "conv_transpose2d": _conv_transposed,
    "conv_transpose3d": _conv_transposed, "cudnn_convolution_transpose": _conv_transposed,
    "miopen_convolution_transpose": _conv_transposed,
    "_mps_convolution_transpose": _conv_transposed,
    "slow_conv_transpose2d": _conv_transposed, "slow_conv_transpose3d": _conv_transposed,
    **ATTENTION_OPS,
}

# Names of ops that do matmul-class work: any of them without a formula is an error. Broad on
# purpose (a backward or an RNN kernel in a counted forward is a surprise worth stopping on).
_MATMUL_CLASS = re.compile(
    r"attention|attn|conv(olution|\d|_tbc|_depthwise|_transpose)"
    r"|(^|_)(mm|bmm|addmm|baddbmm|addbmm|mv|addmv|dot|vdot|matmul|linear|einsum|tensordot"
    r"|addr|chain_matmul|multi_dot|inner|outer|ger|kron|bilinear|lstm|gru|rnn)($|_)")


def is_matmul_class(name: str) -> bool:
    """True for an aten op name (``aten.mm.default``, ``mm`` ...) that does matmul-class work."""
    base = name.split("::")[-1]
    base = base[5:] if base.startswith("aten.") else base
    return bool(_MATMUL_CLASS.search(base.split(".")[0]))


def _op_name(func) -> str:
    return func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)


class MacCounter(TorchDispatchMode):
    """Counts the MACs of everything run inside it, on any device (meta included).

    ``total``: all MACs; ``attention``: the attention part (SDPA kernels, and the bmm's of the
    math path, which in a timm ViT occur only inside attention); ``by_op``: MACs per op name;
    ``seen``: how often each op name ran. Raises ``UncountedOpError`` when an op of matmul
    class (``is_matmul_class``) has no formula in ``FORMULAS``.
    """

    def __init__(self):
        super().__init__()
        self.by_op: Counter = Counter()
        self.seen: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _op_name(func)
        self.seen[name] += 1
        formula = FORMULAS.get(name)
        if formula is not None:
            first = out[0] if isinstance(out, (tuple, list)) else out
            self.by_op[name] += int(formula(*args, _result=first, **kwargs))
        elif is_matmul_class(name):
            raise UncountedOpError(
                f"aten.{name} does matmul-class work but dynavit's MAC counter has no formula "
                f"for it (torch {torch.__version__}); add one to dynavit.trainer.methods.macs.FORMULAS")
        return out

    @property
    def total(self) -> int:
        return int(sum(self.by_op.values()))

    @property
    def attention(self) -> int:
        return int(sum(v for k, v in self.by_op.items()
                       if k in ATTENTION_OPS or k in ("bmm", "baddbmm")))


def count(run: Callable[[], object]) -> MacCounter:
    """Run ``run()`` without grad under a ``MacCounter`` and return the counter."""
    with torch.no_grad(), MacCounter() as mc:
        run()
    return mc


def count_on_zero_images(vit, run: Callable[[torch.Tensor], object], modules=(), batch: int = 1) -> MacCounter:
    """``count`` of ``run(images)`` on ``batch`` zero images of the timm ViT's input size, where
    the model lives (the meta device costs nothing), with ``vit`` and ``modules`` (a method's
    heads) in eval mode for the count (patch dropout or training paths would change the token
    counts) and their modes restored after."""
    p = vit.pos_embed if vit.pos_embed is not None else next(vit.parameters())
    h, w = vit.patch_embed.img_size
    images = torch.zeros(batch, vit.in_chans, h, w, device=p.device, dtype=p.dtype)
    roots = [vit, *modules]
    modes = [(mod, mod.training) for root in roots for mod in root.modules()]
    for root in roots:
        root.eval()
    try:
        return count(lambda: run(images))
    finally:
        for mod, was in modes:
            mod.training = was
