"""Metrics as accumulated sums (jit-able, so a jit over a mesh reduces them across devices)."""
