"""A Hugging Face sequence-classification reward model, and its weighted sum with the rule reward.

The reward model reads (prompt, response) through ITS OWN tokenizer and chat template (a reward model is usually
trained with another template than the policy's), in length-sorted batches; its score is the single logit at the
last token. `WeightedReward` gives reward.weights.rule * rule reward + reward.weights.model * that score; a zero
rule weight skips the rule function entirely, so data with no ground truth (UltraChat) works.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from spinlm.errors import UserError
from spinlm.rewards import score_responses


class RewardModel:
    def __init__(self, path: str, *, device, dtype: torch.dtype = torch.float32, batch_size: int = 16,
                 max_length: int = 1024, trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification

        from spinlm.modeling import load_tokenizer

        if not Path(path).expanduser().is_dir() and path.startswith((".", "/", "~")):
            raise UserError(f"reward.model_path={path}: no such directory")
        self.tokenizer = load_tokenizer(path, trust_remote_code)
        if not self.tokenizer.chat_template:
            raise UserError(f"reward.model_path={path}: its tokenizer has no chat template, so (prompt, response) "
                            "cannot be rendered the way the reward model was trained")
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code).to(device).eval()
        if self.model.config.num_labels != 1:
            raise UserError(f"reward.model_path={path}: a reward model has one output (num_labels=1); this one has "
                            f"{self.model.config.num_labels} (a classifier, not a reward model?)")
        if self.model.config.pad_token_id is None:  # it finds each row's last real token by the pad id
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device, self.batch_size, self.max_length = device, batch_size, max_length

    def render(self, prompt: list[dict], response: str) -> str:
        return self.tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)

    @torch.no_grad()
    def score(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        ids = [self.tokenizer(self.render(p, r), add_special_tokens=False, truncation=True,
                              max_length=self.max_length).input_ids for p, r in zip(prompts, responses)]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # batches of similar length pad little
        scores = [0.0] * len(ids)
        pad = self.tokenizer.pad_token_id
        for s in range(0, len(order), self.batch_size):
            batch = order[s : s + self.batch_size]
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # right padding: the last real token is where the score is read
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for row, i in enumerate(batch):
                scores[i] = float(logits[row, 0])
        return scores


class WeightedReward:
    """rule_weight * rule reward + model_weight * reward-model score, per sample."""

    def __init__(self, rule_fn, reward_model: RewardModel | None, rule_weight: float = 1.0, model_weight: float = 1.0):
        self.rule_fn, self.reward_model = rule_fn, reward_model
        self.rule_weight, self.model_weight = rule_weight, model_weight

    def score(self, items, texts: list[str]) -> list[float]:
        """items: TokenizedExamples (their example's prompt, data_source, ground truth); texts: decoded responses."""
        scores = [0.0] * len(texts)
        if self.reward_model is None or self.rule_weight != 0:
            rule = score_responses(self.rule_fn, items, texts)
            scores = rule if self.reward_model is None else [self.rule_weight * r for r in rule]
        if self.reward_model is not None:
            model = self.reward_model.score([it.example.prompt for it in items], texts)
            for k, (it, m) in enumerate(zip(items, model)):
                if not math.isfinite(m):
                    raise UserError(f"{it.example.origin}: the reward model scored this sample {m}")
                scores[k] += self.model_weight * m
        return scores


def build_reward(reward_cfg, rule_fn, *, device, dtype: torch.dtype) -> WeightedReward:
    model = None
    if reward_cfg.model_path:
        model = RewardModel(str(reward_cfg.model_path), device=device, dtype=dtype,
                            batch_size=reward_cfg.model_batch_size, max_length=reward_cfg.model_max_length,
                            trust_remote_code=reward_cfg.model_trust_remote_code)
    return WeightedReward(rule_fn, model, float(reward_cfg.weights.rule), float(reward_cfg.weights.model))
