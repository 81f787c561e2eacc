"""Benchmarks: held-out splits and the few-shot benchmark."""
