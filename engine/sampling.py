"""The order of training examples, as a pure function of (seed, step).

Each optimizer step takes `micro_batch * grad_accum` examples from a stream. The stream is a run of
phases (a plain run is one phase over all examples); a phase draws from its pool (all, MC only or
subjective only) epoch after epoch, each epoch a seeded permutation (or, with a subjective weight,
a seeded weighted draw with replacement of the pool's size). Since `batch_at(step)` depends on nothing
but the step, a resumed run needs only the step number to continue the same order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from engine.config import PhaseConfig, TrainConfig
from engine.errors import UserError

LENGTH_WINDOW_STEPS = 8


@dataclass(frozen=True)
class Phase:
    index: int
    kinds: str
    subj_weight: float
    epochs: float
    pool: tuple[int, ...]
    first_step: int
    steps: int


class Sampler:
    def __init__(self, kinds: Sequence[str], lengths: Sequence[int], cfg: TrainConfig, seed: int):
        self.kinds, self.lengths = list(kinds), list(lengths)
        self.batch = cfg.micro_batch * cfg.grad_accum
        self.seed = seed
        self.group_by_length = cfg.sampler.group_by_length
        specs = cfg.sampler.phases or [PhaseConfig("all", cfg.epochs, cfg.sampler.subj_weight)]
        self.phases: list[Phase] = []
        step = 0
        for i, spec in enumerate(specs):
            pool = tuple(j for j, k in enumerate(self.kinds) if spec.kinds in ("all", k))
            if not pool:
                raise UserError(f"train.sampler.phases: phase {i + 1} (kinds: {spec.kinds}) has no {spec.kinds} "
                                f"examples to draw from in the training rows")
            weight = cfg.sampler.subj_weight if spec.subj_weight is None else spec.subj_weight
            steps = max(1, math.ceil(spec.epochs * len(pool) / self.batch))
            self.phases.append(Phase(i, spec.kinds, weight, spec.epochs, pool, step, steps))
            step += steps
        self.total_steps = step

    def phase_at(self, step: int) -> Phase:
        for phase in self.phases:
            if step < phase.first_step + phase.steps:
                return phase
        return self.phases[-1]

    def batch_at(self, step: int) -> list[int]:
        """Indices of the examples of optimizer step `step` (0-based)."""
        phase = self.phase_at(step)
        start = (step - phase.first_step) * self.batch
        if self.group_by_length:
            window = self.batch * LENGTH_WINDOW_STEPS
            w = start // window
            chunk = self._length_window(phase.index, w)
            return list(chunk[start - w * window: start - w * window + self.batch])
        return self._stream(phase.index, start, self.batch)

    def epoch_at(self, step: int) -> float:
        """Epochs completed (of the current phase, plus all earlier phases' epochs) after `step`."""
        phase = self.phase_at(step)
        done = sum(p.epochs for p in self.phases[: phase.index])
        return done + (step - phase.first_step + 1) * self.batch / len(phase.pool)

    def is_epoch_end(self, step: int) -> bool:
        phase = self.phase_at(step)
        pos = step - phase.first_step
        n = len(phase.pool)
        return (pos + 1) * self.batch // n > pos * self.batch // n or step == phase.first_step + phase.steps - 1

    def _stream(self, phase_index: int, start: int, count: int) -> list[int]:
        pool_size = len(self.phases[phase_index].pool)
        out = []
        while count > 0:
            epoch, offset = divmod(start, pool_size)
            take = min(count, pool_size - offset)
            out.extend(self._epoch_order(phase_index, epoch)[offset: offset + take])
            start, count = start + take, count - take
        return out

    @lru_cache(maxsize=8)
    def _epoch_order(self, phase_index: int, epoch: int) -> tuple[int, ...]:
        phase = self.phases[phase_index]
        rng = np.random.default_rng([self.seed, phase_index, epoch])
        pool = np.array(phase.pool)
        if phase.subj_weight == 1.0:
            return tuple(int(i) for i in pool[rng.permutation(len(pool))])
        weights = np.array([phase.subj_weight if self.kinds[i] == "subj" else 1.0 for i in pool])
        if weights.sum() == 0:
            raise ValueError(f"curriculum phase {phase_index + 1} gives every example weight 0")
        draw = rng.choice(len(pool), size=len(pool), replace=True, p=weights / weights.sum())
        return tuple(int(i) for i in pool[draw])

    @lru_cache(maxsize=4)
    def _length_window(self, phase_index: int, window: int) -> tuple[int, ...]:
        """A window of steps sorted by length, cut into steps, the steps' order shuffled (seeded)."""
        size = self.batch * LENGTH_WINDOW_STEPS
        idx = sorted(self._stream(phase_index, window * size, size), key=lambda i: -self.lengths[i])
        steps = [idx[k: k + self.batch] for k in range(0, size, self.batch)]
        rng = np.random.default_rng([self.seed, phase_index, window, 1])
        return tuple(i for s in rng.permutation(len(steps)) for i in steps[s])
