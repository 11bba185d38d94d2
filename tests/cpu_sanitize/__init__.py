"""Boundary sweeps of the C++ CPU kernels for the AddressSanitizer + UBSan build
(tests/test_cpu_sanitizers.py, emulation.build.run_cpu_sanitized)."""
