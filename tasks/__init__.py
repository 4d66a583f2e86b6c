"""Prefect tasks: thin wrappers over ``peftflow.pipeline``, one per pipeline step."""
