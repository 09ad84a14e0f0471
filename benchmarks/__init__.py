"""Benchmarks: scripts that write benchmarks/results/*.json and plots."""
import os

# Before torch loads OpenMP: idle threads sleep instead of spinning (see ctxmem/cli.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
