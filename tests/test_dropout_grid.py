"""The kernels' `dropout_grid` argument (csrc/registration.cpp, host::check_dropout_grid): a call
that is the block at (row0, col0) of a larger (.., len_q, len_k) attention draws that attention's
keep mask for its place in it, forward and backward, so blocks merged by their lse reproduce the
whole call with dropout (ring attention's exact dropout). Checked per block against the float64
reference drawing the same grid (a row or column offset off by one draws another mask: far outside
the parity bound), and the merged blocks against the whole call; on the C++ CPU kernels and the
CUDA kernels through the CUDA-on-CPU harness. Triton refuses the argument by name."""

import pytest
import torch

from seqkernels import reference
from seqkernels.distributed import merge_attention_states
from seqkernels.testing import compare

SEED, OFFSET, P = 1234, 5, 0.3


@pytest.fixture(scope="module")
def emu_attention():
    from emulation import load_emulated

    return load_emulated("attention", ["csrc/cuda/attention.cu"])


def _ops(backend, request):
    if backend == "cuda_emu":
        emu = request.getfixturevalue("emu_attention")
        return emu.attention_fwd, emu.attention_bwd
    if backend == "triton":
        return torch.ops.seqkernels.triton_attention_fwd, torch.ops.seqkernels.triton_attention_bwd
    return torch.ops.seqkernels.attention_fwd, torch.ops.seqkernels.attention_bwd


def _fwd(fwd, q, k, v, grid, causal=False):
    scale = q.shape[-1] ** -0.5
    return fwd(q, k, v, None, None, scale, -1, 0 if causal else -1, False, P, SEED, OFFSET, None, None, 0.0, None, None,
               0, 0, False, grid)  # fmt: skip


def _bwd(bwd, go, q, k, v, out, lse, grid, causal=False):
    scale = q.shape[-1] ** -0.5
    return bwd(go, q, k, v, out, lse, None, None, scale, -1, 0 if causal else -1, False, P, SEED, OFFSET, False, None,
               None, 0.0, None, None, 0, 0, grid)[:3]  # fmt: skip


def _ref(q, k, v, go, grid, causal):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = reference.attention_ref(q, k, v, window_right=0 if causal else -1, bottom_right=False, dropout_p=P,
                                       seed=SEED, offset=OFFSET, dropout_grid=grid)  # fmt: skip
    return (out.detach(), lse.detach(), *torch.autograd.grad(out, (q, k, v), go.to(out.dtype)))


# backend -> (dtype, head dim, whole length, row cut, key cut): cuts at residues the tiles do not share.
CASES = {
    "cpu": (torch.float32, 8, 41, 13, 23),
    "cuda_emu": (torch.float16, 64, 37, 11, 19),
    "triton": (torch.float32, 16, 37, 11, 19),  # the interpreter's tiles are 16 wide
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend", list(CASES))
def test_blocks_draw_the_whole_calls_mask(backend, causal, request):
    dtype, D, L, a, b = CASES[backend]
    if causal:  # the same cut for keys: every block sits on or below the global diagonal
        b = a
    fwd, bwd = _ops(backend, request)
    g = torch.Generator().manual_seed(3)
    q, go = (torch.randn(2, 2, L, D, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(2, 1, L, D, generator=g).to(dtype) for _ in range(2))
    whole, whole_lse = _fwd(fwd, q, k, v, [], causal)
    out = torch.zeros(2, 2, L, D, dtype=torch.float32)
    lse = torch.full((2, 2, L), float("-inf"))
    for r0, r1 in ((0, a), (a, L)):
        for c0, c1 in ((0, b), (b, L)):
            if causal and c0 > r1 - 1:
                continue  # no visible key (the ring skips such blocks)
            qs, ks, vs, gs = q[:, :, r0:r1], k[:, :, c0:c1], v[:, :, c0:c1], go[:, :, r0:r1]
            grid = [r0, c0, L, L]
            # A causal block keeps the global diagonal: top-left window right = r0 - c0 (>= 0 here).
            o, l_ = fwd(qs, ks, vs, None, None, D**-0.5, -1, (r0 - c0) if causal else -1, False, P, SEED, OFFSET, None,
                        None, 0.0, None, None, 0, 0, False, grid)  # fmt: skip
            dq, dk, dv = bwd(gs, qs, ks, vs, o, l_, None, None, D**-0.5, -1, (r0 - c0) if causal else -1, False, P, SEED,
                             OFFSET, False, None, None, 0.0, None, None, 0, 0, grid)[:3]  # fmt: skip
            ref, base = (_ref_block(x, qs, ks, vs, gs, grid, causal, r0 - c0) for x in (torch.float64, dtype))
            rep = compare((o, l_), ref[:2], base[:2])
            rep.extend(compare((dq, dk, dv), ref[2:], base[2:], grad=True))
            assert rep.passed, f"block rows {r0}:{r1} keys {c0}:{c1}\n{rep}"
            out[:, :, r0:r1], lse[:, :, r0:r1] = merge_attention_states(out[:, :, r0:r1], lse[:, :, r0:r1], o, l_)
    # The merged blocks are the whole call: the same keep mask at every (b, h, i, j).
    tol = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.to(dtype), whole, **tol)
    torch.testing.assert_close(lse, whole_lse.float(), **tol)


def _ref_block(dtype, q, k, v, go, grid, causal, diag):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = reference.attention_ref(q, k, v, window_right=diag if causal else -1, bottom_right=False, dropout_p=P,
                                       seed=SEED, offset=OFFSET, dropout_grid=grid)  # fmt: skip
    return (out.detach(), lse.detach(), *torch.autograd.grad(out, (q, k, v), go.to(out.dtype)))


@pytest.mark.parametrize("backend", list(CASES))
def test_bad_grids_are_refused(backend, request):
    dtype, D, *_ = CASES[backend]
    fwd, bwd = _ops(backend, request)
    q = torch.randn(1, 1, 5, D).to(dtype)
    for grid, what in (([1, 2, 3], "empty or"), ([3, 0, 7, 5], "row0 + 5"), ([0, 1, 5, 5], "col0 + 5"),
                       ([-1, 0, 9, 9], "row0, col0 >= 0")):  # fmt: skip
        with pytest.raises((RuntimeError, ValueError), match="dropout_grid") as e:  # C++: RuntimeError
            _fwd(fwd, q, q, q, grid)
        assert what in str(e.value)
        out, lse = _fwd(fwd, q, q, q, [])
        with pytest.raises((RuntimeError, ValueError), match="dropout_grid"):
            _bwd(bwd, q, q, q, q, out, lse, grid)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("backend", list(CASES))
def test_grid_offsets_past_2_31(backend, packed, request):
    """A small block far into a huge grid: its first element's index row0 * len_k + col0 is past
    2**31 (the Triton kernels take it as a 64-bit scalar when padded and as two int32 words, the
    low one with its top bit set, when packed), forward and backward against the reference."""
    dtype, D, *_ = CASES[backend]
    fwd, bwd = _ops(backend, request)
    g = torch.Generator().manual_seed(4)
    L = 21
    q, go = (torch.randn(1, 2, L, D, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(1, 1, L, D, generator=g).to(dtype) for _ in range(2))
    grid = [2**11, 5, 2**11 + L, 2**20]  # row0 * len_k + col0 = 2**31 + 5
    vl = (
        (torch.tensor([0, L], dtype=torch.int32), torch.tensor([0, L], dtype=torch.int32), L, L)
        if packed
        else (None,) * 2 + (0, 0)
    )
    args = (None, None, D**-0.5, -1, -1, False, P, SEED, OFFSET, None, None, 0.0, *vl)
    o, l_ = fwd(q, k, v, *args, False, grid)
    dq, dk, dv = bwd(go, q, k, v, o, l_, *args[:9], False, *args[9:], grid)[:3]
    ref, base = (_ref_block(x, q, k, v, go, grid, False, 0) for x in (torch.float64, dtype))
    rep = compare((o, l_), ref[:2], base[:2])
    rep.extend(compare((dq, dk, dv), ref[2:], base[2:], grad=True))
    assert rep.passed, str(rep)
