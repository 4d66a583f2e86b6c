"""Re-run a logged MLflow run from what it recorded, and report each metric's drift.

What a run recorded is enough: its resolved ``params.yaml``, the git commit of the code, and the
DVC hash of its prepared data. The code must be at that commit (checked, not assumed), the data is
restored from the DVC cache or remote by its hash when the workspace holds another version, and
the new run is tagged ``peftflow.reproduces=<run id>``. On CPU with the same seed, thread count
and package versions, the loop is deterministic, so the quality metrics' drift is exactly 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftflow import data, runs, tracking, versioning
from peftflow.config import Params
from peftflow.results import QUALITY_METRICS


def reproduce(run_id: str, root: Path, params: Params, allow_code_change: bool = False) -> dict[str, Any]:
    """Train and evaluate again as run ``run_id`` did; ``params`` gives the tracking store only.

    Returns ``{"original", "run_id", "drift": {metric: new - old}, "original_metrics", "metrics"}``.
    """
    root = Path(root)
    client, _ = tracking.connect(params, root)
    original = tracking.get_run(client, run_id)
    tags = original.data.tags
    commit, current = tags.get("git.commit", "none"), versioning.git_commit(root) or "none"
    if not allow_code_change and (commit != current or versioning.git_dirty(root)):
        state = "with uncommitted changes" if commit == current else f"at {current[:12]}"
        raise versioning.VersioningError(
            f"run {run_id} was made at commit {commit[:12]}, the project is {state}; "
            f"`git checkout {commit[:12]}` first (or allow a code change)"
        )
    run_params = tracking.run_params(client, run_id)
    run_params.tracking = params.tracking  # this store, whatever the original's settings said

    want = tags.get("peftflow.data_version")
    local = run_params.rebased(root)
    manifest_path = local.data.out_dir / "manifest.json"
    have = data.read_manifest(local.data.out_dir)["version"] if manifest_path.is_file() else None
    md5 = tags.get("dvc.data_md5", "none")
    if have != want:
        if md5 == "none":
            raise versioning.VersioningError(f"run {run_id} has data version {want} but no DVC hash to restore it by")
        run_params.data.out_dir = versioning.restored(root, md5, run_params.train.output_dir)
    new_id = runs.train_tracked(run_params, root, md5, tags={"peftflow.reproduces": run_id})
    runs.evaluate_tracked(new_id, root, run_params)
    before, after = dict(original.data.metrics), tracking.run_metrics(client, new_id)
    drift = {k: after[k] - before[k] for k in QUALITY_METRICS if k in before and k in after}
    return {"original": run_id, "run_id": new_id, "drift": drift, "original_metrics": before, "metrics": after}
