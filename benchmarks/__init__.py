"""Benchmark harness: ``run.py`` (fake hosts, shaped link), ``worker.py`` (one rank), ``report.py`` (table, plots)."""
