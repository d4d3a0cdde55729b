"""Benchmarks and measurements: `make bench` (python -m bench) prints tables and writes JSON."""
