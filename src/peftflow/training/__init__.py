"""The training toolbox every recipe shares, and the recipes on top of it.

Toolbox: :mod:`.sampler` (batch *k* is a pure function of (seed, *k*)), :mod:`.checkpoint`
(atomic checkpoints that resume exactly), :mod:`.optim` (optimizer, warmup + decay schedule, one
accumulated and clipped optimizer step normalized by the step's units), :mod:`.meters` (parameter
counts, peak memory). Recipes, each read top to bottom: :mod:`.sft` (supervised fine-tuning, the
core of every method), and :mod:`peftflow.rlhf.reward` / :mod:`peftflow.rlhf.ppo` over the same
toolbox.
"""
