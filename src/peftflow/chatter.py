"""Library chatter that says nothing to a user, silenced in one place (the CLI and every worker);
there too, URL credentials are masked in every log record (:func:`peftflow.secrets.mask_logs`)."""

from __future__ import annotations

import logging
import warnings


def quiet_libraries() -> None:
    from peftflow.secrets import mask_logs

    mask_logs()
    # MLflow announces the tables of every new local store ("Creating initial MLflow database tables...")
    # and checks each saved model's input example against its signature ("Validating input example ...")
    for noisy in ("httpx", "urllib3", "filelock", "mlflow.store.db.utils", "alembic", "mlflow.pyfunc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # bitsandbytes warns at import that an optional CPU kernel package is absent; its own fallback works
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # DeepSpeed logs, on every import without a GPU, that it fell back to its CPU accelerator: on a CPU
    # machine that is no news (a filter outlives DeepSpeed's own set-up of its logger)
    logging.getLogger("DeepSpeed").addFilter(lambda r: "Setting accelerator to CPU" not in r.getMessage())


def quiet_workers() -> None:
    """Also what each of a run's N worker processes would print N times."""
    quiet_libraries()
    # DeepSpeed calls torch.distributed's deprecated collectives by their old names
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*OMP_NUM_THREADS/MKL_NUM_THREADS unset.*")
