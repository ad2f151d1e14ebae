"""Shared test set-up. TRITON_INTERPRET must be set before any module defining kernels is imported."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
