"""``peftflow rlhf ...``: prepare the RLHF data, show a stage's params, sample from a policy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from peftflow.cli_common import console, run_or_exit

rlhf_app = typer.Typer(
    help="The RLHF chain: data, stage params, sampling. Run it with `python -m flows rlhf`.", no_args_is_help=True
)
ParamsDir = Annotated[Path, typer.Option("--params-dir", help="Folder with base.yaml, rlhf/ and methods/.")]
Overrides = Annotated[list[str] | None, typer.Option("--set", "-s", help="KEY.PATH=VALUE (or STAGE:KEY=VALUE).")]


@rlhf_app.command()
def prepare(params_dir: ParamsDir = Path("params"), overrides: Overrides = None) -> None:
    """Prompts, SFT examples and preference pairs -> rlhf.data.out_dir (the rlhf_prepare DVC stage)."""
    from peftflow.rlhf import data
    from peftflow.rlhf.stages import load_stage

    params = run_or_exit(load_stage, "sft", params_dir, overrides or [])
    manifest = run_or_exit(data.prepare, params.rlhf.data, params.data.raw_archive)
    rows = ", ".join(f"{k} {v['rows']}" for k, v in manifest["files"].items())
    console.print(f"RLHF data version {manifest['version']} in {params.rlhf.data.out_dir} ({manifest['note']}): {rows}")


@rlhf_app.command("show-params")
def show_params(
    stage: Annotated[str, typer.Argument(help="sft, reward, judge, ppo or dpo")],
    params_dir: ParamsDir = Path("params"),
    overrides: Overrides = None,
) -> None:
    """A stage's resolved params, after merging."""
    import yaml

    from peftflow.rlhf.stages import load_stage

    typer.echo(yaml.safe_dump(run_or_exit(load_stage, stage, params_dir, overrides or []).to_dict(), sort_keys=False))


@rlhf_app.command()
def generate(
    model_uri: Annotated[str, typer.Argument(help="A policy: models:/peftflow-rlhf-ppo@candidate, or /NAME/VERSION.")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt(s) to continue. Repeatable.")],
    params_dir: ParamsDir = Path("params"),
    root: Annotated[Path, typer.Option(help="Project folder (the MLflow store).")] = Path("."),
    seed: int = 0,
) -> None:
    """Continue prompts with a registered PPO or DPO policy and with its SFT policy, side by side."""
    from peftflow import registry, tracking
    from peftflow.config import read_resolved
    from peftflow.model import load_tokenizer
    from peftflow.rlhf.policy import decode, load_policy, sample
    from peftflow.rlhf.stages import load_stage
    from peftflow.tokens import encode_prompt

    params = run_or_exit(load_stage, "ppo", params_dir)
    client, _ = run_or_exit(tracking.connect, params, root)
    version = run_or_exit(registry.resolve, client, model_uri)
    folder = registry.fetched(client, version, root, params)
    if not (folder / "sft").is_dir():
        typer.secho(f"error: {model_uri}: not a PPO or DPO policy (no sft/ inside)", fg="red", err=True)
        raise typer.Exit(2)
    policy_params = read_resolved(folder / "params.yaml").rebased(root)
    policy, tokenizer = load_policy(policy_params, folder).eval(), load_tokenizer(policy_params.model)
    ids = [encode_prompt(tokenizer, p, policy_params.data) for p in prompt]
    gen, pad, eos = policy_params.rlhf.generation, tokenizer.pad_token_id, tokenizer.eos_token_id
    mine = decode(tokenizer, sample(policy, ids, pad, eos, gen, seed))
    with policy.disable_adapter():
        sft = decode(tokenizer, sample(policy, ids, pad, eos, gen, seed))
    for p, a, b in zip(prompt, mine, sft, strict=True):
        console.print(f"[bold]{p}[/]\n  policy: {p}{a}\n  sft:    {p}{b}", highlight=False)
