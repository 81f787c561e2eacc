"""Meta-learning of the shared backbone: objectives, functional inner loops, algorithms and the trainer."""

from medmeta_plugin.meta.algorithms import ALGORITHMS, InnerConfig, TaskBatch, episode_gradients
from medmeta_plugin.meta.objectives import task_loss, task_score

__all__ = ["ALGORITHMS", "InnerConfig", "TaskBatch", "episode_gradients", "task_loss", "task_score"]
