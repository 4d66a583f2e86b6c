"""RLHF as a chain of versioned stages: supervised fine-tuning (SFT), a reward model trained on
preference pairs, then PPO against it; DPO on the same pairs as the alternative.

- ``params``: the typed ``rlhf:`` params section;
- ``data``: prompts, SFT examples and preference pairs (derived from Pang & Lee, or yours);
- ``reward``: base + PEFT + scalar head, trained with trl's RewardTrainer (Bradley-Terry loss);
- ``policy``: SFT merged into the base, a fresh adapter on top; sampling, log-probs, evaluation;
- ``ppo``: PPO written here (trl 1.x ships no PPOTrainer);
- ``dpo``: trl's DPOTrainer;
- ``stages``: each stage as an MLflow run and a registered version, reused when its inputs are unchanged.

Nothing here imports Prefect; ``tasks/rlhf.py`` and ``flows/rlhf.py`` wrap ``stages``.
"""
