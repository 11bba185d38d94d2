"""The `seqkernels` command: --version, and info and check agreeing on whether Triton is usable."""

import os
import re
import subprocess
import sys

import pytest
import torch

import seqkernels
from seqkernels import backends, check, cli


def test_version_flag(capsys):
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"seqkernels {seqkernels.__version__} (torch {torch.__version__};")


def test_python_m_version_from_outside_the_checkout(tmp_path):
    # `python -m seqkernels --version` goes through __main__; run where the checkout is not the cwd.
    r = subprocess.run(
        [sys.executable, "-m", "seqkernels", "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"seqkernels {seqkernels.__version__} ")


def test_version_is_the_distribution_version():
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("seqkernels")
    except PackageNotFoundError:
        pytest.skip("seqkernels is imported from a source tree without installed metadata")
    assert installed == seqkernels.__version__


def _info_triton(capsys):
    cli.main(["info"])
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if x.startswith("triton ")]
    cells = re.findall(r"triton: (yes|no|not implemented)", out)
    return line.split("usable here: ", 1)[1], cells


def _check_triton(capsys):
    # One small case, float32: enough to see whether check runs Triton or skips it, and why.
    rc = check.main(ops=["lstm_cell"], backends_=["triton"], dtypes=["float32"])
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if x.startswith("triton usable here: ")]
    results = [x.split("  ")[-1].strip() for x in out.splitlines() if x.startswith("lstm_cell")]
    return rc, line.split("usable here: ", 1)[1], results


def test_info_and_check_agree_on_triton(capsys):
    pytest.importorskip("triton")
    info_how, cells = _info_triton(capsys)
    rc, check_how, results = _check_triton(capsys)
    assert info_how == check_how
    usable, how = check.triton_usable()
    assert how == info_how
    assert results
    if usable:
        assert "yes" in cells
        assert rc == 0 and all(r == "pass" for r in results), results
    else:
        assert "yes" not in cells
        assert all(r.startswith("skip") for r in results)


def test_info_and_check_agree_when_the_interpreter_is_off(capsys, monkeypatch):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("with a GPU Triton does not need the interpreter")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    usable, how = check.triton_usable()
    assert not usable and "TRITON_INTERPRET=0" in how
    info_how, cells = _info_triton(capsys)
    rc, check_how, results = _check_triton(capsys)
    assert info_how == check_how == how
    assert "yes" not in cells
    assert rc == 0 and results and all(r.startswith("skip") for r in results)
    assert backends.triton_interpreting() is False


def test_check_names_missing_triton(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "triton" else real(n, *a))
    assert check.triton_usable() == (False, "no: triton is not installed (pip install triton)")


def test_version_single_source():
    # pyproject.toml takes the version from setup.py, which reads it from seqkernels/__init__.py.
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert "version" in project["dynamic"] and "version" not in project
    with open(os.path.join(root, "python", "seqkernels", "__init__.py")) as f:
        assert f'__version__ = "{seqkernels.__version__}"' in f.read()


@pytest.mark.parametrize(
    "argv,match",
    [
        (["check", "--backend", "bogus"], "argument --backend: invalid choice: 'bogus'"),
        (["check", "--op", "scaled_dot_product_attention"], "argument --op: invalid choice"),
        (["check", "--dtype", "int32"], "argument --dtype: invalid choice"),
        (["--bogus"], "unrecognized argument '--bogus'"),
        (["bench", "--backend", "bogus"], "argument --backend: invalid choice: 'bogus'"),
        (["bench", "--dtype", "int32"], "argument --dtype: invalid choice: 'int32'"),
        (["bench", "--device", "tpu"], "--device: expected cpu, cuda or cuda:N, got 'tpu'"),
        (["bench", "--device", "cpu", "--backend", "cuda"], "--backend cuda runs on --device cuda, not cpu"),
        (["bench", "--device", "cpu", "--backend", "triton"], "--backend triton runs on --device cuda, not cpu"),
    ],
)
def test_bad_cli_arguments_are_named(argv, match, capsys):
    """A filter or option the command cannot honour is an argparse error naming it (exit 2), never a
    traceback or a run that checks or measures nothing and exits 0."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert match in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without a GPU")
def test_bench_on_a_missing_gpu_is_named(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--device", "cuda"])
    assert e.value.code == 2
    assert "--device cuda: torch sees no CUDA device" in capsys.readouterr().err


def test_check_validates_filters_when_called_directly():
    with pytest.raises(ValueError, match=r"^op: unknown 'bogus'; expected one of attention"):
        check.main(ops=["bogus"])
