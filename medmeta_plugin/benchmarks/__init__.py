"""Benchmarks that print figures: few-shot suites, placement, the app, active learning, speed.

The held-out splits they evaluate live in :mod:`medmeta_plugin.episodes.splits`, beside the task pool they
are kept out of.
"""
