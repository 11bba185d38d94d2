"""seqkernels.testing: the §5 parity rule as a public API."""

import math

import pytest
import torch
import torch.nn.functional as F

from seqkernels.reference import attention_ref, sdpa_ref
from seqkernels.testing import (
    ParityReport,
    assert_close_to_reference,
    check_parity,
    compare,
    parity_floor,
)

F64 = torch.float64


def rand(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def test_parity_floor_values():
    floors = [parity_floor(d) for d in (F64, torch.float32, torch.float16, torch.bfloat16)]
    assert all(f > 0 for f in floors)
    assert floors == sorted(floors)
    assert parity_floor(torch.float16) == torch.finfo(torch.float16).eps
    assert parity_floor(torch.bfloat16) == torch.finfo(torch.bfloat16).eps
    assert parity_floor(F64) < 1e-10
    assert parity_floor(torch.int32) == 0.0


# ------------------------------------------------------------------------------------------------
# compare
# ------------------------------------------------------------------------------------------------


def _rounded_pair(dtype, seed=1, shape=(5, 17)):
    ref = rand(*shape, seed=seed)
    baseline = ref.to(dtype)  # correctly rounded: err_t = half an ulp
    return ref, baseline


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("grad", [False, True])
def test_compare_bound_is_a_multiple_of_the_baseline_error(dtype, grad):
    ref = rand(5, 17, seed=1)
    base = ref.to(dtype)  # correctly rounded: err_t is at most half an ulp
    err_t = (base.double() - ref).abs().max().item()
    assert err_t > 0
    bound = (3 if grad else 2) * err_t + parity_floor(dtype) * max(1.0, ref.abs().max().item())
    for factor, expect in ((0.99, True), (1.01, False)):
        out = ref.clone()  # float64 "output" of a dtype computation: exact control of err_k
        out[2, 3] += factor * bound
        report = compare(out, ref, base, grad=grad, dtype=dtype)
        row = report.rows[0]
        assert row.baseline_err == pytest.approx(err_t, rel=1e-12)
        assert row.bound == pytest.approx(bound, rel=1e-12)
        assert row.max_err == pytest.approx(factor * bound, rel=1e-9)
        assert report.passed == expect and (row.ratio < 1) == expect


def test_compare_float32_also_needs_assert_close():
    ref = rand(7, 9, seed=2)
    base = (ref + 1e-3).float()  # a sloppy baseline would allow 2e-3 ...
    out = (ref + 5e-4).float()  # ... but float32 must still pass assert_close (atol 1e-5)
    report = compare(out, ref, base)
    assert not report.passed and report.rows[0].close is False
    assert compare(ref.float(), ref, base).passed


def test_compare_nan_positions_must_agree():
    ref = rand(4, 6, seed=3)
    ref[1, 2] = math.nan
    base = ref.half()
    assert compare(ref.half(), ref, base).passed
    out = ref.half().clone()
    out[1, 2] = 0.5  # NaN in the reference, a number in the output
    assert not compare(out, ref, base).passed
    out = ref.half().clone()
    out[0, 0] = math.nan
    report = compare(out, ref, base)
    assert not report.passed and not report.rows[0].nan_agree and "NaN" in str(report)


def test_compare_neg_inf_must_match_exactly():
    ref = rand(2, 3, 5, seed=4)
    ref[0, 1, :] = -math.inf  # lse of fully masked rows
    base = ref.float()
    assert compare(ref.float(), ref, base).passed
    out = ref.float().clone()
    out[0, 1, 2] = -1e30
    assert not compare(out, ref, base).passed
    out = ref.float().clone()
    out[1, 1, 1] = -math.inf
    assert not compare(out, ref, base).passed


def test_compare_structures_and_none():
    ref = (rand(3, 4, seed=5), None, rand(2, seed=6))
    low = tuple(None if t is None else t.half() for t in ref)
    report = compare(low, ref, low, name="grad")
    assert [r.name for r in report.rows] == ["grad[0]", "grad[2]"] and report.passed
    assert not compare((low[0], low[0], low[2]), ref, low).passed  # None on one side only
    assert not compare(low[:2], ref, low).passed  # length differs
    assert not compare(low[0][:2], ref[0], low[0]).passed  # shape differs
    assert not compare(None, None, None).passed  # nothing compared


def test_compare_judges_a_wide_output_by_the_narrowest_one():
    # (out, lse) of a bfloat16 attention: the float32 lse carries bfloat16 input rounding.
    ref_out, ref_lse = rand(2, 3, 5, 8, seed=8), rand(2, 3, 5, seed=9) + 3
    lse = (ref_lse + 2e-3).float()  # far from float32 precision, fine for bfloat16 inputs
    base = (ref_out.bfloat16(), (ref_lse + 3e-3).float())
    report = compare((ref_out.bfloat16(), lse), (ref_out, ref_lse), base)
    assert report.passed, str(report)
    assert report.rows[1].close is None and report.rows[1].bound > parity_floor(torch.bfloat16)
    alone = compare(lse, ref_lse, base[1])  # on its own it is a float32 result: assert_close fails
    assert not alone.passed and alone.rows[0].close is False
    assert compare(lse, ref_lse, base[1], dtype=torch.bfloat16).passed


def test_compare_integer_outputs_are_exact():
    a = torch.arange(10)
    assert compare(a, a.clone(), a).passed
    b = a.clone()
    b[3] = 4
    assert not compare(b, a, a).passed


def test_baseline_overflow_does_not_loosen_the_bound():
    ref = rand(8, seed=7)
    base = ref.half().clone()
    base[0] = math.inf
    out = ref.half().clone()
    out[1] += 0.5
    assert not compare(out, ref, base).passed


# ------------------------------------------------------------------------------------------------
# check_parity / assert_close_to_reference
# ------------------------------------------------------------------------------------------------


def _qkv(seed=0, shape=(2, 3, 17, 16)):
    return tuple(rand(*shape, seed=seed + i, dtype=torch.float32) for i in range(3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_correct_low_precision_function_passes(dtype):
    q, k, v = _qkv()
    report = check_parity(F.scaled_dot_product_attention, sdpa_ref, q, k, v, dtype=dtype, grads=True, is_causal=True)
    assert report.passed, str(report)
    assert [r.name for r in report.rows] == ["out", "grad[args[0]]", "grad[args[1]]", "grad[args[2]]"]
    assert all(r.dtype == dtype for r in report.rows)


def _perturbed_sdpa(q, k, v, **kw):
    return F.scaled_dot_product_attention(q, k, v, **kw) * 1.05


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_perturbed_function_fails(dtype):
    q, k, v = _qkv(seed=10)
    report = check_parity(_perturbed_sdpa, sdpa_ref, q, k, v, dtype=dtype, grads=True)
    assert not report.passed
    assert all(not r.passed for r in report.rows), str(report)
    with pytest.raises(AssertionError, match="FAIL"):
        assert_close_to_reference(_perturbed_sdpa, sdpa_ref, q, k, v, dtype=dtype)


def test_wrong_gradient_only_fails_the_gradient_rows():
    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 1.05

    def fn(q, k, v):
        return F.scaled_dot_product_attention(WrongGrad.apply(q), k, v)

    report = check_parity(fn, sdpa_ref, *_qkv(seed=20), dtype=torch.bfloat16, grads=True)
    passed = {r.name: r.passed for r in report.rows}
    assert passed == {"out": True, "grad[args[0]]": False, "grad[args[1]]": True, "grad[args[2]]": True}


def test_nan_disagreement_fails_check_parity():
    def leaks_nan(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v)
        return out.index_fill(-2, torch.tensor([3], device=out.device), math.nan)

    report = check_parity(leaks_nan, sdpa_ref, *_qkv(seed=30), dtype=torch.float16)
    assert not report.passed and not report.rows[0].nan_agree


def test_report_prints_a_table():
    report = check_parity(F.scaled_dot_product_attention, sdpa_ref, *_qkv(seed=40), dtype=torch.float16, grads=True)
    text = str(report)
    assert isinstance(report, ParityReport)
    lines = text.splitlines()
    assert lines[0].startswith("parity of scaled_dot_product_attention vs sdpa_ref in float16")
    assert any(line.startswith("name") and "bound" in line and "ratio" in line for line in lines)
    assert sum(line.endswith("PASS") for line in lines) == 4
    assert lines[-1].startswith("PASSED: 4/4")
    assert assert_close_to_reference(
        F.scaled_dot_product_attention, sdpa_ref, *_qkv(seed=40), dtype=torch.float16
    ).passed


def test_tuple_outputs_kwargs_and_non_tensor_args():
    q, k, v = _qkv(seed=50, shape=(1, 2, 9, 8))
    lens = torch.tensor([5], dtype=torch.int32)

    def fn(q, k, v, *, kv_lengths, window_right, scale):
        assert kv_lengths.dtype == torch.int32 and isinstance(window_right, int)
        return attention_ref(q, k, v, kv_lengths=kv_lengths, window_right=window_right, scale=scale)

    report = check_parity(
        fn, attention_ref, q, k, v, dtype=torch.bfloat16, grads=True, kv_lengths=lens, window_right=0, scale=0.5
    )
    assert report.passed, str(report)
    names = [r.name for r in report.rows]
    assert names == ["out[0]", "out[1]", "grad[args[0]]", "grad[args[1]]", "grad[args[2]]"]
    assert report.rows[1].dtype == torch.float32  # lse stays float32


def test_only_marked_inputs_get_gradients():
    q, k, v = _qkv(seed=60)
    k.requires_grad_(True)
    report = check_parity(F.scaled_dot_product_attention, sdpa_ref, q, k, v, dtype=torch.float16, grads=True)
    assert [r.name for r in report.rows] == ["out", "grad[args[1]]"]
    assert k.grad is None  # the caller's tensors are untouched


def test_modules_are_cast_and_their_parameter_grads_compared():
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(13, 17), torch.nn.Tanh(), torch.nn.Linear(17, 5))
    x = rand(6, 13, seed=70, dtype=torch.float32)
    report = check_parity(ref, ref, x, dtype=torch.bfloat16, grads=True)
    assert report.passed, str(report)
    assert "grad[param:0.weight]" in [r.name for r in report.rows]
    assert next(ref.parameters()).dtype == torch.float32 and next(ref.parameters()).grad is None

    broken = torch.nn.Sequential(torch.nn.Linear(13, 17), torch.nn.Tanh(), torch.nn.Linear(17, 5))
    broken.load_state_dict(ref.state_dict())
    with torch.no_grad():
        broken[2].bias.add_(0.05)
    report = check_parity(broken, ref, x, dtype=torch.bfloat16, grads=True)
    failed = {r.name for r in report.failures}
    assert "out" in failed and "grad[param:2.bias]" not in failed


def test_in_place_functions_get_their_own_copies():
    from seqkernels.reference import kv_cache_append_ref

    def append(k_cache, v_cache, k_new, v_new, lens):
        kv_cache_append_ref(k_cache, v_cache, k_new, v_new, lens)
        return k_cache, v_cache

    k_cache, v_cache = rand(2, 2, 9, 8, seed=90), rand(2, 2, 9, 8, seed=91)
    k_new, v_new = rand(2, 2, 3, 8, seed=92), rand(2, 2, 3, 8, seed=93)
    before = k_cache.clone()
    lens = torch.tensor([1, 7], dtype=torch.int32)
    report = check_parity(append, append, k_cache, v_cache, k_new, v_new, lens)
    assert report.passed and [r.name for r in report.rows] == ["out[0]", "out[1]"]
    assert torch.equal(k_cache, before)


def test_seeded_generator_is_shared_and_restored():
    def draws(x):  # stands for code that takes a dropout seed from the CPU generator
        seed = int(torch.randint(0, 2**31, ()))
        return attention_ref(x, x, x, dropout_p=0.5, seed=seed)[0]

    x = rand(1, 2, 9, 8, seed=80, dtype=torch.float32)
    state = torch.get_rng_state()
    assert check_parity(draws, draws, x, dtype=torch.float16, seed=3).passed
    assert torch.equal(state, torch.get_rng_state())
