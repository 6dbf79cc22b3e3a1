"""Datasets, partitioners and models: what a client trains and the server evaluates."""

from stamen.tasks.task import Task, load_task  # noqa: F401
