"""Thin entry point: same as `seqkernels bench` (python bench/run.py --quick --suite attention)."""

from seqkernels.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
