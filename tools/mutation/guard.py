"""pytest plugin loaded by the mutation harness (``-p tools.mutation.guard``).

A mutant is judged by the code in the scratch copy only. The editable install's .pth file puts the
working tree's python/ on sys.path too (after PYTHONPATH), so a broken PYTHONPATH, a missing
scratch build of seqkernels._C, or a triton_kernels link that points back into the working tree
would silently test the unmutated code and report every mutant as survived. This plugin stops the
session before any test runs when seqkernels, its extension, its Triton kernels or the tests do
not come from the scratch tree named by SEQKERNELS_MUTATION_ROOT.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

MARKER = "MUTATION-GUARD"


def _inside(path: str, root: str) -> bool:
    p = os.path.realpath(path)
    return p == root or p.startswith(root + os.sep)


def pytest_sessionstart(session):
    root = os.environ.get("SEQKERNELS_MUTATION_ROOT")
    if not root:
        return
    root = os.path.realpath(root)
    problems = []
    if not _inside(str(session.config.rootpath), root):
        problems.append(f"pytest rootdir {session.config.rootpath} is outside {root}")
    import seqkernels

    if not _inside(seqkernels.__file__, root):
        problems.append(f"seqkernels imported from {seqkernels.__file__}")
    try:
        from seqkernels import _ext

        c = _ext.load_extension()
        if not _inside(c.__file__, root):
            problems.append(f"seqkernels._C loaded from {c.__file__}")
    except Exception as e:  # noqa: BLE001 - any failure to load the scratch build is fatal here
        problems.append(f"seqkernels._C does not load from the scratch tree: {e}")
    # find_spec locates the package without running it (no triton import here).
    spec = importlib.util.find_spec("seqkernels.triton_kernels")
    tk = spec.origin if spec is not None and spec.origin else "nowhere"
    if not _inside(tk, root):
        problems.append(f"seqkernels.triton_kernels resolves to {os.path.realpath(tk)}")
    if problems:
        pytest.exit(
            f"{MARKER}: the tests would not judge the scratch copy {root}: " + "; ".join(problems), returncode=3
        )
