"""Thin stage modules: each wires library pieces and writes one stage's outputs."""
