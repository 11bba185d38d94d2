"""Ahead-of-time compilation of sampled Triton STATIC_CONFIGS for the kernel tests (no GPU needed).

The whole list of every module is compiled by seqkernels.kernel_report (tests/test_static_triton.py,
in shards: collect_triton_shard); the kernel tests compile a few entries (compile_static) and check
what matters to their kernels. Compilation runs in a fresh process where triton is not interpreting
(the interpreter's kernels cannot be compiled).
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading

from emulation.build import worker_cores

import seqkernels

_SCRIPT = r"""
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
vec16 = r"global[.\w:]*\.(?:v4\.[bfu]32|v2\.[bf]64)"  # one 16-byte access
for cfg in importlib.import_module(sys.argv[1]).STATIC_CONFIGS:
    if not re.search(sys.argv[2], cfg.name):
        continue
    k = triton.compile(ASTSource(cfg.kernel_fn, cfg.signature, cfg.constexprs, cfg.attrs),
                       target=GPUTarget("cuda", cfg.arch, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    use = dict(zip(("regs", "stack", "shared", "local"),
                   map(int, re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text).groups())))
    ptx = k.asm["ptx"]
    print(json.dumps(dict(name=cfg.name, arch=cfg.arch, mma=cfg.mma_for(cfg.arch), smem=k.metadata.shared,
                          wgmma="wgmma" in ptx, mma_sync="mma.sync" in ptx,
                          v4_loads=len(re.findall("ld\\." + vec16, ptx)),
                          v4_stores=len(re.findall("st\\." + vec16, ptx)), **use)), flush=True)
"""


def compile_static(module: str, pattern: str) -> list:
    """Compile the STATIC_CONFIGS of `module` whose name matches the regex `pattern`, each for its
    arch; one dict per config: name, arch, mma (expected instruction), smem, regs, stack, shared,
    local, wgmma / mma_sync (present in the PTX), v4_loads / v4_stores (16-byte global accesses)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    pkg = os.path.dirname(os.path.dirname(seqkernels.__file__))
    env["PYTHONPATH"] = os.pathsep.join([pkg] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, module, pattern], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


_SHARD_SCRIPT = r"""
import importlib, json, sys
from seqkernels import kernel_report as kr

module, shard, nshards = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
mod = importlib.import_module(module)
# kernel_report compiles what the module's STATIC_CONFIGS lists (by index, in forked workers that
# inherit this module): the shard's share replaces the list in this process only.
mod.STATIC_CONFIGS = list(mod.STATIC_CONFIGS)[shard::nshards]
print("@@ROWS@@" + json.dumps(kr.collect_triton(modules=[module])), flush=True)
"""


def static_shard(configs: list, shard: int, nshards: int) -> list:
    """The entries of a STATIC_CONFIGS list that shard `shard` of `nshards` compiles: every
    nshards-th entry, so that each shard gets its share of every kernel and size."""
    return list(configs)[shard::nshards]


def collect_triton_shard(module: str, shard: int, nshards: int, progress=None) -> list:
    """seqkernels.kernel_report.collect_triton on the entries static_shard(..., shard, nshards) of
    the module's STATIC_CONFIGS: the same rows (same compile, same checks, one per entry and arch),
    for a part of the list, so that the parts of a long list can run on different test workers.
    Runs in a fresh process where triton is not interpreting, with kernel_report's own process pool
    (emulation.build.worker_cores()). `progress(done, total)` is called as compiles finish
    (total: the distinct compiles of the shard, entries that compile the same kernel count once)."""
    env = dict(os.environ, TRITON_INTERPRET="0", SEQKERNELS_REPORT_PROGRESS="1")
    # A pool of one process per core in each shard (four compiles on CI's two cores beside the other
    # worker's tests) cost about an eighth more CPU time per compile (2026-12-06).
    env["MAX_JOBS"] = str(worker_cores())
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.Popen(
        [sys.executable, "-c", _SHARD_SCRIPT, module, str(shard), str(nshards)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: the compile pool goes with it on a timeout
    )
    out: list = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    err = []
    try:
        for line in proc.stderr:
            if line.startswith("@@PROGRESS@@"):
                if progress is not None:
                    done, total = map(int, line.split()[1:3])
                    progress(done, total)
            else:
                err.append(line)
        proc.wait()
    except BaseException:  # pytest-timeout, ^C: no compile left running after the test
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    reader.join()
    stdout, stderr = "".join(out), "".join(err)
    marker = stdout.rfind("@@ROWS@@")
    assert proc.returncode == 0 and marker >= 0, f"{stdout[-4000:]}{stderr[-4000:]}"
    return json.loads(stdout[marker + len("@@ROWS@@") :])
