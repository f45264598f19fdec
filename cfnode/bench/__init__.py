"""Benchmarks that ship with cfnode (`cfnode bench ...`)."""
