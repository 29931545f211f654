"""Benchmarks, installed as `perco.benchmarks` so `perco bench` can run them."""
