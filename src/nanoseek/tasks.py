"""Verifiable tasks for reasoning RL: ``from nanoseek.tasks import get_task`` (implementation: nanoseek.data.tasks)."""

from nanoseek.data.tasks import *  # noqa: F403
from nanoseek.data.tasks import __all__  # noqa: F401
