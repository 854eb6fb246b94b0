"""Benchmarks (not tests): `python -m harness.benchmarks.NAME`; they print figures, never assert timings."""
