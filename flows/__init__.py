"""Prefect flows: wiring of the tasks in ``tasks/``, nothing else. Run them with ``python -m flows``."""
