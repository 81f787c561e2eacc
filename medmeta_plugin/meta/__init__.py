"""Meta-learning of the shared backbone: the algorithms (each runs the product's one adaptation as its inner
loop, :func:`medmeta_plugin.adapt.adapt_batch`), their configuration and the trainer."""

from medmeta_plugin.meta.algorithms import ALGORITHMS, InnerConfig, TaskBatch, episode_gradients

__all__ = ["ALGORITHMS", "InnerConfig", "TaskBatch", "episode_gradients"]
