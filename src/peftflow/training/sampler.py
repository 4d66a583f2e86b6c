"""Which examples make each micro-batch: a pure function of (seed, micro-batch index)."""

from __future__ import annotations

import torch


class Sampler:
    """Micro-batch k of the run is a pure function of (seed, k): resume needs only the step.

    Each epoch is a seeded shuffle; within windows of 32 batches, examples are grouped by length
    (and the batches shuffled again), so batches carry little padding but stay random.
    """

    WINDOW = 32  # batches per length-grouping window

    def __init__(self, lengths: list[int], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.lengths, self.bs, self.seed, self.rank, self.world = lengths, batch_size, seed, rank, world
        self.per_epoch = len(lengths) // (batch_size * world)  # global batches per epoch; the rest is dropped
        if self.per_epoch == 0:
            raise ValueError(
                f"train.batch_size: {batch_size} x {world} process(es) exceeds the {len(lengths)} training examples"
            )
        self._epoch, self._batches = -1, []

    def _plan(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        size = self.bs * self.world
        perm = perm[: self.per_epoch * size]
        batches = []
        for w in range(0, len(perm), size * self.WINDOW):
            window = sorted(perm[w : w + size * self.WINDOW], key=self.lengths.__getitem__)
            chunk = [window[i : i + size] for i in range(0, len(window), size)]
            order = torch.randperm(len(chunk), generator=g).tolist()
            batches += [chunk[i] for i in order]
        return batches

    def step_indices(self, step: int, grad_accum: int) -> list[list[int]]:
        """The micro-batches of optimizer step ``step`` (1-based), ``grad_accum`` of them."""
        return [self.indices((step - 1) * grad_accum + k) for k in range(grad_accum)]

    def indices(self, micro: int) -> list[int]:
        epoch, pos = divmod(micro, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._plan(epoch)
        return self._batches[pos][self.rank :: self.world]
