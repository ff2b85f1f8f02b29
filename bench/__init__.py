"""Benchmarks: `python -m bench <name> [--quick]` from the repo root. Results go to docs/benchmarks.md and
bench/results/<name>.json; each comparison runs both sides in one process, interleaved, and reports medians."""
