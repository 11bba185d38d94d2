"""Triton kernels with known answers for testing the static report (kernel_report.py): a matrix
product that must use tensor cores, an elementwise kernel, a 16-row matrix product (mma.sync even on
sm_90), a configuration whose shared memory cannot fit, and an elementwise kernel that claims tensor cores. Follows the STATIC_CONFIGS protocol the kernel modules use."""

import triton
import triton.language as tl


@triton.jit
def _selftest_matmul_kernel(
    A,
    B,
    C,
    stride_am,
    stride_bk,
    stride_cm,
    K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(A + rm[:, None] * stride_am + (k + rk)[None, :])
        b = tl.load(B + (k + rk)[:, None] * stride_bk + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(C + rm[:, None] * stride_cm + rn[None, :], acc)


@triton.jit
def _selftest_scale_kernel(X, Y, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n)
    tl.store(Y + offs, x * alpha, mask=offs < n)


_MM_SIG = {
    "A": "*fp16",
    "B": "*fp16",
    "C": "*fp32",
    "stride_am": "i32:16",
    "stride_bk": "i32:16",
    "stride_cm": "i32:16",
    "K": "constexpr",
    "BLOCK_M": "constexpr",
    "BLOCK_N": "constexpr",
    "BLOCK_K": "constexpr",
}

STATIC_CONFIGS = [
    (_selftest_matmul_kernel, _MM_SIG, {"K": 256, "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, 4, 3, True),
    (
        _selftest_scale_kernel,
        {"X": "*fp32", "Y": "*fp32", "n": "i32", "alpha": "fp32", "BLOCK": "constexpr"},
        {"BLOCK": 1024},
        4,
        1,
        False,
    ),
    # A 16-row tile is below wgmma's minimum: tensor cores through mma.sync on sm_90 too.
    (_selftest_matmul_kernel, _MM_SIG, {"K": 128, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}, 4, 2, "mma"),
    # 8 stages of 256x128 + 128x256 fp16 tiles: far beyond any arch's shared memory.
    (_selftest_matmul_kernel, _MM_SIG, {"K": 1024, "BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 128}, 8, 8, True),
    # An elementwise kernel declared as a matrix product: no tensor-core PTX where some is expected,
    # so the report disassembles it (the plain entry above is not) and finds none.
    (
        _selftest_scale_kernel,
        {"X": "*fp32", "Y": "*fp32", "n": "i32", "alpha": "fp32", "BLOCK": "constexpr"},
        {"BLOCK": 512},
        4,
        1,
        True,
    ),
]
