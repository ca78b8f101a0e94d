"""What both runners share around the training step: how a run stops early."""

from __future__ import annotations


class Interrupted(Exception):
    """Training stopped by Ctrl-C after saving a resumable checkpoint."""
