"""dynavit's own MAC counter (dynavit.trainer.methods.macs): formulas from shapes, the same on every
device and torch version, and no matmul-class op silently counted as 0.

Why this exists: torch 2.14.1's FlopCounterMode counted the CPU attention kernel
(aten._scaled_dot_product_flash_attention_for_cpu) as 0 FLOPs while meta counted its bmm's,
so a CPU training run matched ToMe r=16 where `dynatrain flops` (meta) said r=17.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from dynavit.manifests import k_count
from dynavit.trainer.methods import macs as macs_mod
from dynavit.trainer.methods.budget import closed_form_evit_macs, closed_form_tome_macs
from dynavit.trainer.methods.flops import closed_form_macs, model_dims
from dynavit.trainer.methods.macs import FORMULAS, MacCounter, UncountedOpError, count, is_matmul_class
from dynavit.trainer.model import make_heads, meta_copy, method_forward

# 12 blocks: EViT's default keep layers (4, 7, 10) exist; tiny dims keep it fast on CPU.
KW = dict(img_size=32, patch_size=4, embed_dim=32, depth=12, num_heads=2, num_classes=5)
PARAMS = {"dynavit": None, "tome": 3, "evit": 0.6, "dynamicvit": 0.7, "tnt": 0.8, "cropr": 4}


def _vit(device: str) -> VisionTransformer:
    torch.manual_seed(0)
    with torch.device(device):
        return VisionTransformer(**KW).eval()


def _forward(vit, heads, method, k=50):
    x = torch.zeros(2, 3, 32, 32, device=vit.pos_embed.device)
    keep = None
    if method == "dynavit":
        n = vit.patch_embed.num_patches
        keep = torch.arange(k_count(k, n), device=x.device).expand(2, -1)
    return lambda: method_forward(vit, x, keep, method, PARAMS[method], heads=heads)


def _zero_matmul_ops(mc: MacCounter) -> list[str]:
    """Ops of matmul class that ran and were counted as 0 (the failure this file guards)."""
    return [op for op in mc.seen if is_matmul_class(op) and mc.by_op.get(op, 0) == 0]


@pytest.mark.parametrize("method", list(PARAMS))
def test_every_method_counts_the_same_on_cpu_and_meta_and_no_matmul_op_is_zero(method):
    cpu = _vit("cpu")
    heads = make_heads(cpu, method, KW["num_classes"])
    heads = heads.eval() if heads is not None else None
    meta, meta_heads = meta_copy(cpu), meta_copy(heads)
    a = count(_forward(cpu, heads, method))
    b = count(_forward(meta, meta_heads, method))
    assert _zero_matmul_ops(a) == [] and _zero_matmul_ops(b) == []
    assert a.total == b.total > 0
    assert a.attention == b.attention > 0
    # the attention the CPU ran fused is what meta ran as bmm's: the same MACs
    assert any(op in macs_mod.ATTENTION_OPS or op == "bmm" for op in a.seen)


def test_cpu_attention_kernel_is_counted_by_formula():
    # timm's fused attention on CPU: whichever SDPA kernel this torch picks, QKᵀ + AV MACs
    q = torch.randn(2, 3, 7, 8)
    k = torch.randn(2, 3, 5, 8)
    v = torch.randn(2, 3, 5, 6)
    mc = count(lambda: F.scaled_dot_product_attention(q, k, v))
    assert mc.total == mc.attention == 2 * 3 * 7 * 5 * (8 + 6)
    assert _zero_matmul_ops(mc) == []


def test_matmul_and_conv_formulas_against_hand_counts():
    a, b = torch.randn(4, 6), torch.randn(6, 5)
    assert count(lambda: a @ b).total == 4 * 6 * 5
    assert count(lambda: torch.randn(3, 4, 6) @ torch.randn(3, 6, 5)).total == 3 * 4 * 6 * 5
    assert count(lambda: F.linear(torch.randn(2, 7, 6), torch.randn(5, 6), torch.randn(5))).total == 2 * 7 * 6 * 5
    x, w = torch.randn(2, 4, 9, 9), torch.randn(8, 2, 3, 3)  # groups=2, stride 2, padding 1 -> 5x5
    out_hw = 5 * 5
    assert count(lambda: F.conv2d(x, w, stride=2, padding=1, groups=2)).total == 2 * out_hw * 8 * 2 * 3 * 3
    wt = torch.randn(4, 3, 2, 2)  # transposed: every input position scatters Cout/g·k² MACs per Cin
    assert count(lambda: F.conv_transpose2d(x, wt, stride=2)).total == 2 * 9 * 9 * 4 * 3 * 2 * 2


def test_a_matmul_class_op_without_formula_is_an_error_not_a_zero(monkeypatch):
    # What torch 2.14.1 did to the CPU attention kernel (counted 0) must fail loudly here.
    q = torch.randn(1, 2, 4, 8)
    with MacCounter() as probe:
        F.scaled_dot_product_attention(q, q, q)
    fused = [op for op in probe.seen if op in macs_mod.ATTENTION_OPS]
    name = fused[0] if fused else "bmm"
    monkeypatch.delitem(FORMULAS, name)
    with pytest.raises(UncountedOpError, match=name):
        count(lambda: F.scaled_dot_product_attention(q, q, q))


def test_every_attention_kernel_torch_registers_has_a_formula():
    # The next torch release adding an SDPA kernel fails here (run by make test-latest),
    # instead of silently counting 0.
    names = {n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("aten::")}
    forward_attention = {n for n in names if "attention" in n and "backward" not in n
                         and not n.endswith("_no_dropout_inplace")
                         and n not in ("_native_multi_head_attention", "_triton_multi_head_attention",
                                       "_triton_scaled_dot_attention", "_fused_sdp_choice")}
    missing = sorted(n for n in forward_attention if n not in FORMULAS)
    assert missing == [], f"attention kernels without a MAC formula: {missing}"
    for n in ("mm", "addmm", "bmm", "baddbmm", "convolution", "_scaled_dot_product_flash_attention_for_cpu",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
        assert is_matmul_class(n) and n in FORMULAS
    for n in ("add", "gelu", "native_layer_norm", "_softmax", "_safe_softmax", "cat", "index_select"):
        assert not is_matmul_class(n)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_closed_forms_are_exact(device):
    vit = _vit(device)
    dims = model_dims(vit)
    n = dims["N"]
    for k in (100, 70, 50, 25):
        S = vit.num_prefix_tokens + k_count(k, n)
        mc = count(_forward(vit, None, "dynavit", k))
        assert mc.total == 2 * closed_form_macs(S=S, **dims)  # batch of 2
    const = count(_forward(vit, None, "dynavit", 100)).total // 2 - closed_form_tome_macs(vit, 0)
    x = torch.zeros(1, 3, 32, 32, device=device)
    for r in (0, 2, 5):
        got = count(lambda: method_forward(vit, x, None, "tome", r)).total
        assert got == closed_form_tome_macs(vit, r, const)
    for rate in (1.0, 0.7, 0.4):
        got = count(lambda: method_forward(vit, x, None, "evit", rate)).total
        assert got == closed_form_evit_macs(vit, rate, const=const)
