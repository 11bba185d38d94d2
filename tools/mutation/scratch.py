"""The scratch copy the mutants are applied to.

The working tree is never touched: its tracked and untracked-but-not-ignored files are mirrored
into a scratch directory (symlinks kept as symlinks), and only files whose bytes differ are
rewritten, so the scratch tree's build outputs (ninja's objects for ``seqkernels._C``, the
emulation harness's ``build/emulation``) stay valid and rebuilds are incremental.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

MANIFEST = ".mutation-manifest.json"
BUILD_STAMP = ".mutation-build-stamp"
BUILD_LOG = ".mutation-build.log"


def repo_files(repo: Path) -> list[str]:
    """Tracked files plus untracked files git does not ignore, relative to `repo`."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return sorted({p for p in out.split("\0") if p})


def _same_file(src: Path, dst: Path) -> bool:
    if src.is_symlink() or dst.is_symlink():
        return src.is_symlink() and dst.is_symlink() and os.readlink(src) == os.readlink(dst)
    if not dst.is_file():
        return False
    st_s, st_d = src.stat(), dst.stat()
    if st_s.st_size != st_d.st_size:
        return False
    return src.read_bytes() == dst.read_bytes()


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        else:
            dst.unlink()
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        # copyfile, not copy2: the copy gets a fresh mtime so make-style tools see it as newer.
        shutil.copyfile(src, dst)
        shutil.copymode(src, dst)


def sync(repo: Path, scratch: Path, log=print) -> list[str]:
    """Mirror `repo`'s source files into `scratch`; return the paths that were (re)written."""
    scratch.mkdir(parents=True, exist_ok=True)
    files = repo_files(repo)
    changed = []
    present = []
    for rel in files:
        src = repo / rel
        if not (src.is_symlink() or src.is_file()):
            continue  # deleted in the working tree but still tracked
        present.append(rel)
        dst = scratch / rel
        if not _same_file(src, dst):
            _copy(src, dst)
            changed.append(rel)
    # Remove files an earlier sync wrote that the working tree no longer has.
    man = scratch / MANIFEST
    if man.exists():
        old = set(json.loads(man.read_text()))
        for rel in sorted(old - set(present)):
            p = scratch / rel
            if p.is_symlink() or p.is_file():
                p.unlink()
                changed.append(rel)
    man.write_text(json.dumps(present))
    if changed:
        log(f"scratch: {len(changed)} file(s) refreshed from {repo}")
    return changed


def link_triton_kernels(scratch: Path) -> None:
    """Make `seqkernels.triton_kernels` resolve inside the scratch copy.

    An install maps the top-level triton_kernels/ onto seqkernels.triton_kernels (setup.py's
    package_dir); the scratch copy is imported through PYTHONPATH instead, where that mapping does not
    exist (and the working tree's editable finder would answer with the unmutated kernels), so the
    scratch gets the link an install would otherwise stand for."""
    link = scratch / "python" / "seqkernels" / "triton_kernels"
    target = Path("..") / ".." / "triton_kernels"
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    if link.is_symlink() or link.is_file():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)


# Files the CPU extension (SEQKERNELS_CUDA=0) is built from.
def cpu_build_inputs(root: Path) -> list[Path]:
    paths = [root / "setup.py", root / "csrc" / "registration.cpp"]
    for sub in ("cpu", "common"):
        paths += sorted((root / "csrc" / sub).glob("*"))
    return [p for p in paths if p.is_file()]


def cpu_build_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in cpu_build_inputs(root):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def extension_present(root: Path) -> bool:
    return any((root / "python" / "seqkernels").glob("_C*.so"))


def build(root: Path, timeout: float, jobs: int = 1, log=print) -> tuple[bool, float, str]:
    """Build seqkernels._C (CPU part only) in place in `root` if its inputs changed since the
    last successful build. Returns (ok, seconds, tail of the build output)."""
    digest = cpu_build_digest(root)
    stamp = root / BUILD_STAMP
    if extension_present(root) and stamp.exists() and stamp.read_text() == digest:
        return True, 0.0, ""
    env = dict(os.environ, SEQKERNELS_CUDA="0", MAX_JOBS=str(jobs))
    t0 = time.monotonic()
    log(f"build: python setup.py build_ext --inplace (MAX_JOBS={jobs}) in {root}")
    try:
        proc = subprocess.run(
            [sys.executable, "setup.py", "build_ext", "--inplace"],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        ok, out = proc.returncode == 0, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        partial = e.stdout or ""
        if isinstance(partial, bytes):
            partial = partial.decode(errors="replace")
        ok, out = False, f"build timed out after {timeout}s\n" + partial[-4000:]
    dt = time.monotonic() - t0
    (root / BUILD_LOG).write_text(out)
    if ok:
        stamp.write_text(digest)
    elif stamp.exists():
        stamp.unlink()
    return ok, dt, out[-3000:]


def object_dependencies(root: Path) -> dict[str, frozenset]:
    """For each file of `root` that a compiled object of the extension depends on (per ninja's
    recorded header dependencies): the names of those objects. Empty when unknown (no build yet,
    ninja missing)."""
    out: dict[str, set] = {}
    for build_dir in sorted((root / "build").glob("temp.*")):
        if not (build_dir / ".ninja_deps").exists():
            continue
        try:
            text = subprocess.run(
                ["ninja", "-t", "deps"], cwd=build_dir, capture_output=True, text=True, timeout=60, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        obj = None
        prefix = str(root) + os.sep
        for line in text.splitlines():
            if line and not line[0].isspace():
                obj = Path(line.split(":", 1)[0]).name
            elif obj and line.strip().startswith(prefix):
                out.setdefault(line.strip()[len(prefix) :], set()).add(obj)
    return {k: frozenset(v) for k, v in out.items()}
