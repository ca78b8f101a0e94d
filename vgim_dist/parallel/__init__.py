"""Parallelism inside a stage: data-parallel replicas."""
