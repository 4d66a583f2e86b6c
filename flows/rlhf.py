"""The RLHF chain as a Prefect flow: data -> SFT -> reward model (and the held-out judge) -> PPO, and DPO beside it."""

from __future__ import annotations

from typing import Literal

from prefect import flow

from peftflow.pipeline import Project
from tasks import rlhf as steps

HERE = Project()
Stage = Literal["sft", "reward", "judge", "ppo", "dpo"]


@flow(name="rlhf")
def rlhf(project: Project = HERE, force: list[Stage] | None = None) -> list[dict]:
    """SFT -> reward model -> PPO (and DPO), each an MLflow run and a registered version; a stage
    whose params, data and input versions are unchanged reuses its registered version. The judge,
    a reward model on the other half of the pairs, scores PPO and DPO beside the reward model.

    Args:
        project: the project folder, params folder and overrides (KEY=VALUE, or STAGE:KEY=VALUE for one stage)
        force: stages to retrain even if a matching version exists (e.g. after a code change)
    """
    project = project.frozen()  # every step of this run reads the params files as they are now
    force = force or []
    data = steps.prepare_data(project)
    sft = steps.run_stage(project, "sft", data, {}, "sft" in force)
    reward = steps.run_stage(project, "reward", data, {}, "reward" in force)
    judge = steps.run_stage(project, "judge", data, {}, "judge" in force)
    inputs = {"sft": sft, "reward": reward, "judge": judge}
    ppo = steps.run_stage(project, "ppo", data, inputs, "ppo" in force)
    dpo = steps.run_stage(project, "dpo", data, inputs, "dpo" in force)
    results = [sft, reward, judge, ppo, dpo]
    steps.publish(data, results)
    return [r.model_dump() for r in results]
