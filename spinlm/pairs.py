"""Preference pairs as token ids: what the trainer judges, the workers learn from and the run directory stores.

Plain Python lists only (no torch), so every layer can use them: the run directory writes and reads them, the
trainer forms them, the workers pack them into tensors.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Pairs:
    """Token-level preference pairs: chosen and rejected responses to the same prompt.

    `weights` is 1 for a real pair and 0 for a padding copy (data parallel ranks must run the same number of
    forwards, so a short rank is padded); None means all real. `sft_mask` is 1 where the SFT term (sft_weight)
    trains on the chosen response and 0 where it does not (algorithm.sft_on_correct_only); None means everywhere.
    """

    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    weights: list[float] | None = None
    sft_mask: list[float] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def weight_list(self) -> list[float]:
        return self.weights if self.weights is not None else [1.0] * len(self)

    def sft_mask_list(self) -> list[float]:
        return self.sft_mask if self.sft_mask is not None else [1.0] * len(self)

    def select(self, idx: list[int]) -> "Pairs":
        w, m = self.weight_list(), self.sft_mask_list()
        return Pairs([self.prompts[i] for i in idx], [self.chosen[i] for i in idx], [self.rejected[i] for i in idx],
                     [w[i] for i in idx], [m[i] for i in idx])


@dataclass
class RoundPairs:
    """A round's judged pairs plus what is needed to write them out."""

    pairs: Pairs
    origins: list[str]
    chosen_scores: list[float | None]
    rejected_scores: list[float | None]
