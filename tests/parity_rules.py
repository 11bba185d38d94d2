"""The parity rule (docs/DESIGN.md §5) as the hostile-input and property tests apply it.

`seqkernels.testing.compare` is the rule; the two allowances below are for inputs chosen to sit
at the edge of a dtype, where plain torch in that dtype itself fails the rule's float32
assert_close against float64, or where an exact zero comes from a cancellation that torch's
autograd performs exactly and a FlashAttention backward cannot. Each allowance is narrow and
spelled out; the 2x-torch bound and the NaN/inf agreement always hold.
"""

from seqkernels import testing


def assert_rule(got, ref, base, grad, name, dtype, cancel_floor=0.0):
    """The parity rule, with two allowances for degenerate generated cases, each narrow:

    - its float32 assert_close part is waived where plain torch in that dtype fails assert_close
      against float64 itself (cancellation at adversarial magnitudes); the 2x-torch bound and the
      NaN/inf agreement still hold there;
    - `cancel_floor` (gradients only) is one rounding of the terms the FlashAttention backward
      subtracts: dS = P * (dP - Delta) with dP = dO.V and Delta = dO.O. When a row's softmax is
      one-hot (one visible key) the exact dQ/dK are 0 and torch's autograd cancels them exactly,
      while the kernel's two dot products round differently, leaving about eps * |dO||V||K| scale.
    """
    rep = testing.compare(got, ref, base, grad=grad, name=name, dtype=dtype)
    if rep.passed:
        return
    torch_close = testing.compare(base, ref, base, grad=grad, name=name, dtype=dtype)
    for r, t in zip(rep.rows, torch_close.rows):
        in_bound = r.max_err <= r.bound + cancel_floor
        cancelled = 0 < r.max_err <= cancel_floor  # the whole error is the cancellation's rounding
        waived = (r.close is not False or t.close is False or cancelled) and in_bound and r.nan_agree and r.inf_agree
        assert r.passed or waived, str(rep) + (f"\n(cancellation floor {cancel_floor:.3e})" if cancel_floor else "")
