"""The harness's own test kernels (selftest_kernels.cu) and their op schemas."""

from .build import load_emulated, run_in_subprocess, run_sanitized

SOURCES = ["tests/emulation/selftest_kernels.cu"]
NAME = "selftest"
SCHEMAS = [
    "selftest_shfl(Tensor vals, int mode, int arg, int width, int mask) -> Tensor",
    "selftest_vote(Tensor pred, Tensor vals, int mask) -> Tensor",
    "selftest_atomics(Tensor ivals, Tensor fvals, int blocks) -> Tensor[]",
    "selftest_block_reduce(Tensor x, int threads, bool dynamic_smem) -> Tensor",
    "selftest_poison(Tensor like, int blocks) -> Tensor",
    "selftest_convert(Tensor x, Tensor y) -> Tensor[]",
    "selftest_ldmatrix(Tensor m, int n, bool trans) -> Tensor",
    "selftest_mma(Tensor a, Tensor b, Tensor c, bool a_trans, bool b_trans, int zero_rows_from) -> Tensor",
    "selftest_race(Tensor x, bool sync) -> Tensor",
    "selftest_oob(Tensor x, int where) -> Tensor",
    "selftest_misuse(Tensor like, int which) -> ()",
    "selftest_launch(Tensor like, int bx, int by, int bz, int smem_bytes, bool optin) -> Tensor",
    "selftest_device_info(Tensor like, int which) -> int",
]


def load_selftest():
    return load_emulated(NAME, SOURCES, schemas=SCHEMAS)


def run_selftest_sanitized(sanitizer, func, *args, **kwargs):
    return run_sanitized(sanitizer, NAME, SOURCES, func, *args, schemas=SCHEMAS, **kwargs)


def run_selftest_subprocess(func, *args, **kwargs):
    return run_in_subprocess(NAME, SOURCES, func, *args, schemas=SCHEMAS, **kwargs)
