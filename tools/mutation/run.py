"""Mutation harness: apply each mutant of mutants.toml to a scratch copy of the repository, rebuild
what it touches, run its op's tests, and report killed / survived / equivalent / stale.

    python -m tools.mutation --list                      # every mutant and whether it still applies
    python -m tools.mutation --check                     # the same; exit 1 if any is stale
    python -m tools.mutation --sample 6 --seed 1         # a stratified random subset
    python -m tools.mutation --only ID[,ID...]           # named mutants
    python -m tools.mutation                             # all of them (hours on 2 cores)

See docs/MUTATION.md. The working tree is never modified: its files are mirrored into --scratch
(default /tmp/seqkernels-mutants), where seqkernels._C is built in place (CPU part) and the
emulation tests build the CUDA sources under build/emulation.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fcntl
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tools.mutation import scratch as _scratch  # noqa: E402
else:
    from . import scratch as _scratch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MUTANTS = HERE / "mutants.toml"
DEFAULT_SCRATCH = Path("/tmp/seqkernels-mutants")
ORACLE = "python/seqkernels/reference.py"  # what every test compares against: never mutated
CPU_BUILD_PREFIXES = ("csrc/cpu/", "csrc/common/", "csrc/registration.cpp")

# Final statuses. "killed" counts toward the score with "timeout" (a mutant that makes the tests
# hang is caught, though not by an assertion) and "equivalent" is excluded from the denominator.
KILLED, SURVIVED, EQUIVALENT = "killed", "survived", "equivalent"
STALE, TIMEOUT, ERROR = "stale", "timeout", "error"


# ------------------------------------------------------------------------------------------------
# Mutants


@dataclass
class Suite:
    name: str
    tests: list[str]
    k: str | None = None
    timeout: float | None = None


@dataclass
class Mutant:
    id: str
    file: str
    find: str
    replace: str
    suite: Suite
    why: str = ""
    equivalent: str | None = None
    extra_args: list[str] = field(default_factory=list)

    @property
    def area(self) -> str:
        return area_of(self.file)

    @property
    def cpu_build(self) -> bool:
        return self.file.startswith(CPU_BUILD_PREFIXES)


def area_of(path: str) -> str:
    for prefix, area in (
        ("csrc/common/", "common"),
        ("csrc/cpu/", "cpu"),
        ("csrc/cuda/", "cuda"),
        ("triton_kernels/", "triton"),
        ("python/", "python"),
    ):
        if path.startswith(prefix):
            return area
    return "other"


def load_mutants(path: Path = MUTANTS) -> list[Mutant]:
    data = tomllib.loads(path.read_text())
    suites = {}
    for name, s in data.get("suites", {}).items():
        suites[name] = Suite(name, list(s["tests"]), s.get("k"), s.get("timeout"))
    out, seen = [], set()
    for i, m in enumerate(data.get("mutant", [])):
        mid = m.get("id") or f"#{i}"
        for key in ("id", "file", "find", "replace"):
            if key not in m:
                raise ValueError(f"{path}: mutant {mid} lacks '{key}'")
        if mid in seen:
            raise ValueError(f"{path}: duplicate mutant id {mid}")
        seen.add(mid)
        if m["file"] == ORACLE:
            raise ValueError(f"{path}: mutant {mid} targets {ORACLE}, the oracle the tests compare against")
        if m["find"] == m["replace"]:
            raise ValueError(f"{path}: mutant {mid} does not change anything")
        if "suite" in m:
            if m["suite"] not in suites:
                raise ValueError(f"{path}: mutant {mid} names unknown suite {m['suite']!r}")
            suite = suites[m["suite"]]
            if "k" in m:
                suite = Suite(f"{suite.name}[{m['k']}]", suite.tests, m["k"], suite.timeout)
        elif "tests" in m:
            suite = Suite(f"<{mid}>", list(m["tests"]), m.get("k"), m.get("timeout"))
        else:
            raise ValueError(f"{path}: mutant {mid} needs 'suite' or 'tests'")
        out.append(
            Mutant(
                mid,
                m["file"],
                m["find"],
                m["replace"],
                suite,
                m.get("why", ""),
                m.get("equivalent"),
                list(m.get("pytest_args", [])),
            )
        )
    return out


def _find_pattern(find: str) -> re.Pattern:
    # Matched up to whitespace: any run of whitespace (none included) may sit between two
    # non-whitespace characters, so a mutant survives the formatters (clang-format, ruff format)
    # re-wrapping or re-spacing the code it names. The match starts and ends on non-whitespace.
    chars = [c for c in find if not c.isspace()]
    return re.compile(r"\s*".join(re.escape(c) for c in chars))


def locate(m: Mutant, text: str) -> list[tuple[int, int]]:
    """The spans of `text` that `m.find` matches (up to whitespace)."""
    return [x.span() for x in _find_pattern(m.find).finditer(text)]


def applies(m: Mutant, root: Path) -> tuple[bool, str]:
    """Whether `m.find` occurs exactly once (up to whitespace) in its file under `root`."""
    p = root / m.file
    if not p.is_file():
        return False, f"{m.file} does not exist"
    n = len(locate(m, p.read_text()))
    if n != 1:
        return False, f"`find` occurs {n} times in {m.file} (must be exactly once)"
    return True, ""


def mutate(m: Mutant, text: str) -> str:
    """`text` with the one match of `m.find` replaced by `m.replace` (leading and trailing
    whitespace of both are the text's own)."""
    ((lo, hi),) = locate(m, text)
    return text[:lo] + m.replace.strip() + text[hi:]


def stratified_sample(mutants: list[Mutant], n: int, seed: int) -> list[Mutant]:
    """n mutants spread over the areas: each area's list shuffled, then taken round-robin over the
    areas in a shuffled order. Deterministic for a given mutant list and seed."""
    rng = random.Random(seed)
    by_area: dict[str, list[Mutant]] = {}
    for m in sorted(mutants, key=lambda m: m.id):
        by_area.setdefault(m.area, []).append(m)
    areas = sorted(by_area)
    rng.shuffle(areas)
    for a in areas:
        rng.shuffle(by_area[a])
    out = []
    while len(out) < n and any(by_area.values()):
        for a in areas:
            if by_area[a] and len(out) < n:
                out.append(by_area[a].pop(0))
    return out


# ------------------------------------------------------------------------------------------------
# Running


@dataclass
class Result:
    id: str
    area: str
    file: str
    status: str
    seconds: float = 0.0
    build_seconds: float = 0.0
    test_seconds: float = 0.0
    detail: str = ""
    tests: str = ""
    why: str = ""
    equivalent: str | None = None


def log(msg: str) -> None:
    print(f"[mutation {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _pytest_cmd(suite: Suite, extra: list[str], stop_first: bool = True) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *(["-x"] if stop_first else []),
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "tools.mutation.guard",
        *suite.tests,
    ]
    if suite.k:
        cmd += ["-k", suite.k]
    return cmd + extra


def _suite_desc(suite: Suite, extra: list[str]) -> str:
    s = " ".join(suite.tests)
    if suite.k:
        s += f" -k '{suite.k}'"
    if extra:
        s += " " + " ".join(extra)
    return s


def _test_env(root: Path) -> dict:
    env = dict(os.environ)
    prev = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(root / "python") + (os.pathsep + prev if prev else "")
    env["SEQKERNELS_MUTATION_ROOT"] = str(root)
    # Source files are rewritten within a second of each other (mutant, then the original), so
    # bytecode caches keyed by mtime could serve a stale module: none are written or kept.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("MAX_JOBS", "1")
    return env


def _summarize(output: str) -> str:
    """The first FAILED/ERROR line of pytest's -ra summary, or the last meaningful line."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line[:300]
    for line in reversed(output.splitlines()):
        if line.strip() and not line.startswith("="):
            return line.strip()[:300]
    return ""


def failed_node_ids(output: str) -> list[str]:
    """Node ids of the FAILED / ERROR lines of pytest's -ra summary."""
    ids = []
    for line in output.splitlines():
        for tag in ("FAILED ", "ERROR "):
            if line.startswith(tag):
                nid = line[len(tag) :].split(" - ", 1)[0].strip()
                if "::" in nid and nid not in ids:
                    ids.append(nid)
    return ids


def run_tests(
    root: Path, suite: Suite, extra: list[str], timeout: float, stop_first: bool = True
) -> tuple[str, float, str, str]:
    """(outcome, seconds, summary, full output); outcome is pass / fail / timeout / empty / guard."""
    cmd = _pytest_cmd(suite, extra, stop_first)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=root,
        env=_test_env(root),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # pytest and any compiler / child it started
        out, _ = proc.communicate()
        return "timeout", time.monotonic() - t0, f"no result after {timeout:.0f} s", out
    dt = time.monotonic() - t0
    rc = proc.returncode
    if rc == 3 and "MUTATION-GUARD" in out:
        return "guard", dt, _summarize(out), out
    if rc == 0:
        return "pass", dt, _summarize(out), out
    if rc == 5:
        return "empty", dt, "no tests selected", out
    return "fail", dt, _summarize(out), out


class Harness:
    def __init__(self, root: Path, timeout: float, jobs: int, build_timeout: float, log_dir: Path):
        self.root = root
        self.timeout = timeout
        self.jobs = jobs
        self.build_timeout = build_timeout
        self.log_dir = log_dir

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / ".mutation.lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another mutation run holds {self.root}/.mutation.lock") from None
        _scratch.sync(REPO, self.root, log=log)
        _scratch.link_triton_kernels(self.root)
        for d in ("python", "triton_kernels", "tests", "tools"):
            for cache in (self.root / d).rglob("__pycache__"):
                shutil.rmtree(cache, ignore_errors=True)
        self.ensure_built(initial=True)

    def ensure_built(self, initial: bool = False) -> tuple[bool, float, str]:
        ok, dt, tail = _scratch.build(self.root, self.build_timeout, self.jobs, log=log)
        if dt:
            log(f"build {'ok' if ok else 'FAILED'} in {dt:.0f} s")
        if initial and not ok:
            raise SystemExit(f"the unmutated scratch copy does not build:\n{tail}")
        return ok, dt, tail

    def baseline(self, suite: Suite, extra: list[str]) -> tuple[str, float, str, list[str]]:
        """Runs the selection on the unmutated copy, without -x. Returns (verdict, seconds, detail,
        failing node ids): verdict "pass"; "deselect" when some tests fail unmutated (the mutants are
        then judged without them, and the report lists them); "bad" when the selection cannot judge
        anything (collection errors, a timeout, no test selected)."""
        self.ensure_built(initial=True)
        outcome, dt, summary, out = run_tests(self.root, suite, extra, suite.timeout or self.timeout, stop_first=False)
        self._save_log(f"baseline-{re.sub(r'[^A-Za-z0-9_.-]+', '_', _suite_desc(suite, extra))[:120]}", out)
        if outcome == "guard":
            raise SystemExit(summary)
        if outcome == "pass":
            return "pass", dt, "", []
        failing = failed_node_ids(out)
        collection_error = bool(re.search(r"errors? during collection|ERROR collecting", out))
        if outcome == "fail" and failing and not collection_error:
            return "deselect", dt, f"{len(failing)} test(s) fail unmutated", failing
        return "bad", dt, f"{outcome}: {summary}", failing

    def _save_log(self, name: str, text: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.log_dir / f"{name}.log").write_text(text)

    def run_one(self, m: Mutant, deselect: list[str] = ()) -> Result:
        res = Result(
            m.id, m.area, m.file, ERROR, tests=_suite_desc(m.suite, m.extra_args), why=m.why, equivalent=m.equivalent
        )
        t0 = time.monotonic()
        ok, reason = applies(m, self.root)
        if not ok:
            res.status, res.detail = STALE, reason
            return res
        path = self.root / m.file
        original = path.read_text()
        try:
            path.write_text(mutate(m, original))
            if m.cpu_build:
                ok, res.build_seconds, tail = self.ensure_built()
                if not ok:
                    self._save_log(m.id, tail)
                    res.status, res.detail = KILLED, "build failed: " + _last_error(tail)
                    return res
            extra = list(m.extra_args) + [a for nid in deselect for a in ("--deselect", nid)]
            outcome, res.test_seconds, summary, out = run_tests(
                self.root, m.suite, extra, m.suite.timeout or self.timeout
            )
            self._save_log(m.id, out)
            if outcome == "guard":
                raise SystemExit(summary)
            if outcome == "fail":
                res.status, res.detail = KILLED, summary
            elif outcome == "timeout":
                res.status, res.detail = TIMEOUT, summary
            elif outcome == "empty":
                res.status, res.detail = ERROR, "the mutant's test selection selects no test"
            elif m.equivalent:
                res.status, res.detail = EQUIVALENT, m.equivalent
            else:
                res.status, res.detail = SURVIVED, summary
            if m.equivalent and res.status in (KILLED, TIMEOUT):
                res.detail = "declared equivalent but killed (fix the mutant's note): " + res.detail
            return res
        finally:
            path.write_text(original)
            res.seconds = time.monotonic() - t0


def _last_error(tail: str) -> str:
    for line in tail.splitlines():
        if "error:" in line:
            return line.strip()[:300]
    return tail.strip().splitlines()[-1][:300] if tail.strip() else ""


# ------------------------------------------------------------------------------------------------
# Reports

SCORED = (KILLED, TIMEOUT, SURVIVED)


def summary_counts(results: list[Result]) -> dict:
    counts = {s: 0 for s in (KILLED, TIMEOUT, SURVIVED, EQUIVALENT, STALE, ERROR)}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    scored = sum(counts[s] for s in SCORED)
    counts["score"] = round((counts[KILLED] + counts[TIMEOUT]) / scored, 4) if scored else None
    return counts


def markdown(results: list[Result], meta: dict) -> str:
    c = summary_counts(results)
    score = "n/a" if c["score"] is None else f"{100 * c['score']:.0f}%"
    lines = [
        f"Run of {meta['date']} ({meta['command']}), {len(results)} mutant(s), "
        f"{meta['wall_seconds']:.0f} s wall, tree at {meta.get('git_head', '?')}"
        + (" plus uncommitted changes" if meta.get("dirty") else "")
        + ".",
        "",
        f"killed {c[KILLED]}, timeout {c[TIMEOUT]}, survived {c[SURVIVED]}, equivalent {c[EQUIVALENT]}, "
        f"stale {c[STALE]}, error {c[ERROR]}; "
        f"score (killed + timeout) / (killed + timeout + survived) = {score}",
        "",
    ]
    for desc, ids in (meta.get("deselected_failing_unmutated") or {}).items():
        groups: dict[str, int] = {}
        for i in ids:
            base = i.split("[", 1)[0]
            groups[base] = groups.get(base, 0) + 1
        lines.append(
            f"Failing on the unmutated tree, deselected from `{desc}` ({len(ids)}): "
            + ", ".join(f"`{g}`" + (f" ({n} cases)" if n > 1 else "") for g, n in groups.items())
            + " (full ids in the JSON report)."
        )
        lines.append("")
    for desc, why in (meta.get("bad_selections") or {}).items():
        lines.append(f"Selection `{desc}` cannot judge on the unmutated tree ({why}): its mutants are `error`.")
        lines.append("")
    lines += [
        "| id | area | status | seconds (build + tests) | detail |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        detail = (r.detail or "").replace("|", "\\|")
        lines.append(
            f"| `{r.id}` | {r.area} | {r.status} | {r.seconds:.0f} ({r.build_seconds:.0f} + "
            f"{r.test_seconds:.0f}) | {detail} |"
        )
    return "\n".join(lines) + "\n"


def _git(*args: str) -> str:
    try:
        proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True)
        return proc.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


# ------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.mutation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--list", action="store_true", help="list the mutants and whether each applies to the working tree")
    ap.add_argument("--check", action="store_true", help="like --list, exit 1 if any mutant is stale")
    ap.add_argument("--only", help="comma-separated mutant ids")
    ap.add_argument("--area", help="comma-separated areas (common, cpu, cuda, triton, python)")
    ap.add_argument("--sample", type=int, help="run N mutants, stratified over the areas")
    ap.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    ap.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH, help=f"scratch copy (default {DEFAULT_SCRATCH})")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per test run unless the suite sets one")
    ap.add_argument("--build-timeout", type=float, default=3600, help="seconds per build of seqkernels._C")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS") or 1), help="MAX_JOBS of builds")
    ap.add_argument(
        "--no-baseline", action="store_true", help="skip running each selected suite on the unmutated copy first"
    )
    ap.add_argument("--report", type=Path, help="write the results as JSON here and as markdown next to it (.md)")
    ap.add_argument("--mutants", type=Path, default=MUTANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    mutants = load_mutants(args.mutants)
    if args.list or args.check:
        stale = 0
        by_area: dict[str, int] = {}
        for m in mutants:
            ok, reason = applies(m, REPO)
            stale += not ok
            by_area[m.area] = by_area.get(m.area, 0) + 1
            flag = "applies" if ok else f"STALE ({reason})"
            eq = "  [declared equivalent]" if m.equivalent else ""
            print(f"{m.id:44s} {m.area:7s} {flag}{eq}")
            print(f"{'':44s} {m.file} :: {_suite_desc(m.suite, m.extra_args)}")
        print(
            f"\n{len(mutants)} mutants ({', '.join(f'{a} {n}' for a, n in sorted(by_area.items()))}); "
            f"{stale} stale against {REPO}"
        )
        return 1 if (args.check and stale) else 0

    selected = mutants
    if args.only:
        want = [s.strip() for s in args.only.split(",") if s.strip()]
        known = {m.id: m for m in mutants}
        missing = [w for w in want if w not in known]
        if missing:
            ap.error(f"unknown mutant id(s): {', '.join(missing)}")
        selected = [known[w] for w in want]
    if args.area:
        areas = {a.strip() for a in args.area.split(",")}
        selected = [m for m in selected if m.area in areas]
    if args.sample is not None:
        selected = stratified_sample(selected, args.sample, args.seed)
    if not selected:
        ap.error("no mutant selected")

    started = time.monotonic()
    command = "python -m tools.mutation " + " ".join(argv if argv is not None else sys.argv[1:])
    h = Harness(
        args.scratch.resolve(), args.timeout, args.jobs, args.build_timeout, args.scratch.resolve() / ".mutation-logs"
    )
    # The tree is judged as mirrored now; record it now (a run takes hours, HEAD may move meanwhile).
    git_head = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    h.prepare()

    # C++ mutants first, grouped by the objects their file is compiled into (ninja's recorded
    # dependencies: attention_math.h, philox.h and attention.cpp all rebuild attention.o), so that
    # restoring one mutant and compiling the next are one rebuild; then the rest (no rebuild).
    order = {m.id: i for i, m in enumerate(mutants)}
    deps = _scratch.object_dependencies(h.root)
    selected.sort(
        key=lambda m: (
            not m.cpu_build,
            sorted(deps.get(m.file, ())) if m.cpu_build else [],
            m.file if m.cpu_build else "",
            order[m.id],
        )
    )
    log(f"{len(selected)} mutant(s): {', '.join(m.id for m in selected)}")

    bad_suites: dict[str, str] = {}
    deselected: dict[str, list[str]] = {}
    baselines: dict[str, float] = {}
    if not args.no_baseline:
        for m in selected:
            desc = _suite_desc(m.suite, m.extra_args)
            if desc in baselines or not applies(m, h.root)[0]:
                continue
            verdict, dt, detail, failing = h.baseline(m.suite, m.extra_args)
            baselines[desc] = round(dt, 1)
            log(f"baseline {verdict} in {dt:.0f} s: {desc}" + (f" ({detail})" if detail else ""))
            if verdict == "bad":
                bad_suites[desc] = detail
            elif verdict == "deselect":
                deselected[desc] = failing
                for nid in failing:
                    log(f"    fails unmutated, deselected for its mutants: {nid}")

    results = []
    try:
        for i, m in enumerate(selected, 1):
            desc = _suite_desc(m.suite, m.extra_args)
            if desc in bad_suites:
                results.append(
                    Result(
                        m.id,
                        m.area,
                        m.file,
                        ERROR,
                        detail="the unmutated tree fails this selection: " + bad_suites[desc],
                        tests=desc,
                        why=m.why,
                        equivalent=m.equivalent,
                    )
                )
            else:
                log(f"[{i}/{len(selected)}] {m.id} ({m.file})")
                results.append(h.run_one(m, deselected.get(desc, [])))
                if desc in deselected:
                    results[-1].detail += f" [{len(deselected[desc])} test(s) that fail unmutated deselected]"
            r = results[-1]
            log(
                f"    {r.status} in {r.seconds:.0f} s "
                f"(build {r.build_seconds:.0f}, tests {r.test_seconds:.0f})" + (f": {r.detail}" if r.detail else "")
            )
    finally:
        h.ensure_built()  # leave the scratch build matching the unmutated sources

    meta = {
        "date": _dt.date.today().isoformat(),
        "command": command,
        "wall_seconds": round(time.monotonic() - started, 1),
        "git_head": git_head,
        "dirty": dirty,
        "scratch": str(h.root),
        "baseline_seconds": baselines,
        "deselected_failing_unmutated": deselected,
        "bad_selections": bad_suites,
        "counts": summary_counts(results),
    }
    md = markdown(results, meta)
    print("\n" + md)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        payload = {"meta": meta, "results": [r.__dict__ for r in results]}
        args.report.write_text(json.dumps(payload, indent=2) + "\n")
        args.report.with_suffix(".md").write_text(md)
        log(f"report: {args.report} and {args.report.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
