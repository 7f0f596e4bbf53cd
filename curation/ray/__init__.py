"""The only package that imports Ray: the stage executor and job entrypoints."""

from curation.ray.executor import RayExecutor
from curation.ray.session import executor_for

__all__ = ["RayExecutor", "executor_for"]
