"""Benchmarks: speed, memory and loading against diffusers' pipeline on a GPU."""
