"""Exact MACs of ToMe / EViT and budget matching against Dyna-ViT (dynavit.trainer.methods.budget)."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from dynavit.trainer.bench.compare import compare, format_compare
from dynavit.trainer.methods.budget import (_stem_head_macs, budget_table, closed_form_evit_macs,
                                    closed_form_tome_macs, count_dynavit_macs,
                                    count_evit_macs, count_tome_macs, match_budget,
                                    match_evit_keep_rate, match_tome_r)
from dynavit.trainer.methods.flops import count_macs


def tiny_vit(device=None, **kw):
    with torch.device(device or "cpu"):
        torch.manual_seed(0)
        return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3,
                                 num_heads=2, num_classes=5, **kw).eval()


def test_zero_reduction_costs_what_dense_costs():
    m = tiny_vit()
    dense = count_macs(m, 100)
    assert count_tome_macs(m, 0) == dense
    assert count_evit_macs(m, 1.0) == dense


@pytest.mark.parametrize("kw", [{}, dict(reg_tokens=3, qkv_bias=True)])
def test_closed_forms_equal_the_exact_counts(kw):
    m = tiny_vit(**kw)
    const = _stem_head_macs(m)
    for r in (2, [4, 0, 1]):
        assert count_tome_macs(m, r) == closed_form_tome_macs(m, r, const), r
    for kr in (0.5, 0.2):
        for fuse in (True, False):
            assert count_evit_macs(m, kr, layers=(1, 2), fuse=fuse) == \
                closed_form_evit_macs(m, kr, (1, 2), fuse, const), (kr, fuse)


def test_cpu_count_equals_meta_count():
    cpu, meta = tiny_vit(), tiny_vit("meta")
    assert count_tome_macs(cpu, 3) == count_tome_macs(meta, 3)
    assert count_evit_macs(cpu, 0.5, layers=(2,)) == count_evit_macs(meta, 0.5, layers=(2,))


def test_matching_finds_the_closest_exact_count():
    # brute force over every parameter with the closed forms (equal to the exact counts,
    # see above); the search itself reports exact counts
    m = tiny_vit()
    const = _stem_head_macs(m)
    for k in (90, 50, 1):
        target = count_macs(m, k)
        r, macs = match_tome_r(m, target)
        assert macs == closed_form_tome_macs(m, r, const)
        assert abs(macs - target) == min(abs(closed_form_tome_macs(m, rr, const) - target)
                                         for rr in range(0, 9))
        kr, macs = match_evit_keep_rate(m, target, layers=(1, 2), step=0.01)
        assert macs == closed_form_evit_macs(m, kr, (1, 2), True, const)
        assert abs(macs - target) == min(
            abs(closed_form_evit_macs(m, i / 100, (1, 2), True, const) - target)
            for i in range(1, 101))


@pytest.mark.parametrize("k", [70, 50])
def test_vit_base_matched_within_5_percent(k):
    res = match_budget("vit_base_patch16_224", k)  # meta device: no weights
    target = res["dynavit"]["macs"]
    assert target == count_dynavit_macs(_meta_vit_b(), k)["macs"]
    for method in ("tome", "evit"):
        assert abs(res[method]["macs"] - target) <= 0.05 * target, (method, res[method])
        assert res[method]["rel"] == pytest.approx((res[method]["macs"] - target) / target)
    assert isinstance(res["tome"]["r"], int) and 0 < res["tome"]["r"] < 98
    assert 0 < res["evit"]["keep_rate"] < 1 and res["evit"]["layers"] == [4, 7, 10]
    assert not res["tome"]["at_limit"] and not res["evit"]["at_limit"]
    table = budget_table([res])
    assert "tome" in table and "evit" in table and f"r={res['tome']['r']}" in table


_VIT_B = []


def _meta_vit_b():
    if not _VIT_B:
        from dynavit.trainer.methods.flops import build_meta_model
        _VIT_B.append(build_meta_model("vit_base_patch16_224"))
    return _VIT_B[0]


def test_unreachable_budget_is_flagged():
    m = tiny_vit()
    res = match_budget(m, 1, evit_layers=(3,))  # EViT prunes only in the last block
    assert res["evit"]["at_limit"] and res["evit"]["keep_rate"] == 0.001
    assert "limit" in budget_table([res])


def test_bench_compare_smoke():
    res = compare("vit_tiny_patch16_224", [50], batch=2, steps=1, repeats=1, warmup=0,
                  ref_model=None, model_kwargs=dict(img_size=64, depth=2))
    methods = [r["method"] for r in res["ks"][0]["rows"]]
    assert methods[:3] == ["dynavit", "tome", "evit"]  # then the learned methods the model allows
    assert "svit" in methods  # 2 blocks: one selector, before block 2
    assert all(r["imgs_per_s"] > 0 for r in res["ks"][0]["rows"])
    out = format_compare(res)
    assert "dense" in out and "tome" in out and "evit" in out


def test_learned_method_at_its_limit_is_flagged_in_its_budget_record():
    """budget_record's at_limit for a learned method: DynamicViT pruning only after block 3 of 4
    cannot get as cheap as Dyna-ViT at K=10 (its cheapest rho still costs more: the reference
    count), while its default stages reach K=50."""
    from dynavit.trainer.methods.budget import count_tome_macs
    from dynavit.trainer.methods.budget_limit import at_limit
    from dynavit.trainer.methods.dynamicvit import RHO_STEP, DynamicViTHeads, count_dynamicvit_macs
    from dynavit.trainer.model import budget_record

    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5).eval()
    late = DynamicViTHeads.for_model(m, layers=(3,))
    target = count_dynavit_macs(m, 10)["macs"]
    assert count_dynamicvit_macs(m, late, RHO_STEP) > target
    rec = budget_record(m, "dynamicvit", 10, late)
    assert rec["at_limit"] and rec["param"] == RHO_STEP and rec["macs"] > target
    assert not budget_record(m, "dynamicvit", 50, DynamicViTHeads.for_model(m))["at_limit"]
    # above the target, but a cheaper setting exists (ToMe at r=1 vs its r = N // 2): not a limit
    assert not at_limit(m, "tome", 10, count_tome_macs(m, 1), target)


def test_every_method_has_a_cheapest_parameter_for_the_limit_check():
    """at_limit compares with the method's cheapest setting: a method missing from
    cheapest_param (SViT was, after it joined) made budget_record fail for it."""
    from dynavit.trainer.methods.budget_limit import cheapest_param
    from dynavit.trainer.selection import METHODS

    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5).eval()
    assert cheapest_param(m, "dynavit") is None
    assert all(cheapest_param(m, method) is not None for method in METHODS if method != "dynavit")
