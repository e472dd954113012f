"""The round loop of SPIN and online DPO, read top to bottom. Holds no weights: the worker group generates, computes
log-probs and trains; this module decides what each round does with them.

    round t:  opponent := policy                       (the checkpoint the round starts from; with
                                                        algorithm.reference=initial the loss's reference stays the
                                                        start model, while the policy still generates)
              generate : the opponent answers the round's prompts
              judge    : spin       -> chosen = ground truth, rejected = own sample
                         online_dpo -> n samples scored by the reward; best vs worst, ties dropped
              learn    : preference loss of the policy against the opponent
              review   : held-out accuracy, checkpoint, metrics
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from spinlm.config import online_dpo_total_steps
from spinlm.core_algos import apply_missing_eos_penalty, pair_by_reward
from spinlm.errors import UserError
from spinlm.evaluate import accuracy_metrics, pass_at_k_metrics
from spinlm.model_card import write_model_card
from spinlm.pairs import Pairs, RoundPairs
from spinlm.rewards.reward_model import WeightedReward
from spinlm.rollout.hf_rollout import SamplingParams
from spinlm.run_dir import (RunDir, TrainerState, read_pairs, save_checkpoint, write_pairs,
                            write_round_table)
from spinlm.seeding import (EPOCH_ORDER, EVAL_GREEDY, EVAL_SAMPLE, ONLINE_GENERATE, ROUND_PROMPTS, SPIN_GENERATE,
                             SPIN_PAIR_ORDER, seed_for)
from spinlm.workers.dp_actor import LossSettings


log = logging.getLogger(__name__)

# a round's samples of which more than this share ran into max_response_length: worth a warning
CUT_WARNING_SHARE = 0.5


class NonFiniteError(UserError):
    """Too many consecutive steps with a non-finite loss or gradient, or parameters made non-finite by a step."""


class CollapseError(UserError):
    """The collapse warning, with trainer.stop_on_collapse=true."""


class NoPairsError(UserError):
    """online_dpo: a whole round in which every prompt tied, so nothing could be learned."""


class SpinTrainer:
    def __init__(self, cfg, workers, tokenizer, train_items, val_items, reward_fn, run_dir: Path, tracker,
                 state: TrainerState, reward: WeightedReward | None = None):
        self.cfg = cfg
        self.workers = workers  # a worker group: one in-process rank, or Ray actors
        self.tokenizer = tokenizer
        self.train_items = train_items
        self.val_items = val_items
        self.reward_fn = reward_fn  # the rule reward: val accuracy
        self.reward = reward or WeightedReward(reward_fn, None)  # what judges samples: rule and/or reward model
        self.run_dir = Path(run_dir)
        self.tracker = tracker
        self.state = state
        self.mode = cfg.algorithm.mode
        self.bad_in_a_row = 0
        self.policy_is_opponent = False  # no update since the opponent was last set to the policy
        self.timings: dict[str, float] = {}

    # ---- the loop ---------------------------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        cfg = self.cfg
        if self.state.next_round == 0 and cfg.trainer.eval_before_training and self.val_items:
            start = self.evaluate()
            self.tracker.log(start, round=0, step=0, kind="val")
            self.state.table.append({"round": "start", **_row(start, {})})
        for t in range(self.state.next_round, cfg.trainer.rounds):
            self.timings = {}
            self.warned_cut = False
            self.counts = {"rollout_tokens": 0, "update_tokens": 0, "steps": 0, "chosen_drift": 0.0, "margins": 0.0}
            round_start = time.perf_counter()
            train_metrics = self.spin_round(t) if self.mode == "spin" else self.online_dpo_round(t)
            self.check_collapse(t)  # before the round's checkpoint: a collapsed round is never saved
            val = self.evaluate() if self.val_items else {}
            self.state.next_round = t + 1
            # the round's row goes in before the checkpoint that carries the table, so a resumed run has it too
            row = {"round": t + 1, **_row(val, train_metrics), "time_s": time.perf_counter() - round_start}
            self.state.table.append(row)
            with self.timer("save"):
                self.save(t, val)
            summary = {**val, **{f"time/{k}": v for k, v in self.timings.items()},
                       "time/round": time.perf_counter() - round_start,
                       "perf/peak_memory_gb": self.workers.peak_memory_bytes() / 2**30,
                       "perf/rollout_tokens_per_s": self.counts["rollout_tokens"] / max(self.timings.get("generate", 0), 1e-9),
                       "perf/update_tokens_per_s": self.counts["update_tokens"] / max(self.timings.get("update", 0), 1e-9)}
            self.tracker.log(summary, round=t + 1, step=self.state.global_step, kind="val")
            row["time_s"] = summary["time/round"]  # with the save; the checkpoint's copy has the time before it
            self.save_table()
        return self.state.table

    # ---- mode spin: chosen = ground truth, rejected = the opponent's own answer ----------------------------------------
    def spin_round(self, t: int) -> dict:
        cfg = self.cfg
        picked = self.round_indices(t)  # positions in the training set: each prompt's key for its random draws
        items = [self.train_items[i] for i in picked]
        given = [it for it in items if it.rejected_ids is not None]
        if t == 0 and len(given) == len(items):  # the data carries rejected responses: round 0 is offline DPO
            judged = RoundPairs(Pairs([it.prompt_ids for it in items], [it.response_ids for it in items],
                                      [it.rejected_ids for it in items]),
                                [it.example.origin for it in items], [None] * len(items), [None] * len(items))
            rollout_metrics = {"rollout/given_pairs": float(len(items))}
        else:
            rollout = self.rollout(items, picked, self.sampling(n=1), seed_for(cfg, SPIN_GENERATE, t),
                                   f"round {t + 1} generate")
            with self.timer("judge"):
                judged, rollout_metrics = self.judge_against_ground_truth(items, rollout)
        self.write_pairs(t, judged)
        self.tracker.log(rollout_metrics, round=t + 1, step=self.state.global_step, kind="rollout")

        pairs = self.with_history(t, judged.pairs)
        initial = cfg.algorithm.reference == "initial"  # then the reference is the resident frozen start model
        self.policy_is_opponent = not initial or t == 0  # the initial reference is the policy until round 1 trains
        with self.timer("ref_logps"):  # the opponent IS the policy now: its log-probs become numbers, one model stays
            ref_chosen = self.workers.sequence_logps(pairs.prompts, pairs.chosen, opponent=initial,
                                                     desc=f"round {t + 1} reference log-probs (chosen)")
            ref_rejected = self.workers.sequence_logps(pairs.prompts, pairs.rejected, opponent=initial,
                                                       desc=f"round {t + 1} reference log-probs (rejected)")
        batch = cfg.trainer.train_batch_size
        steps_per_epoch = math.ceil(len(pairs) / batch)
        self.workers.start_schedule(steps_per_epoch * cfg.trainer.epochs_per_round)
        last: dict = {}
        with self.timer("update"):
            bar = tqdm(total=steps_per_epoch * cfg.trainer.epochs_per_round, desc=f"round {t + 1} train", leave=False)
            for epoch in range(cfg.trainer.epochs_per_round):
                generator = torch.Generator().manual_seed(seed_for(cfg, SPIN_PAIR_ORDER, t, epoch))
                order = torch.randperm(len(pairs), generator=generator)
                for s in range(0, len(pairs), batch):
                    idx = order[s : s + batch].tolist()
                    last = self.train_step(t, pairs.select(idx), (ref_chosen[idx], ref_rejected[idx]))
                    bar.update(1)
            bar.close()
        if not initial:
            self.workers.refresh_opponent()  # keeps no copy in full fine-tuning; with LoRA, merges the adapter
        return {**rollout_metrics, **last}

    def judge_against_ground_truth(self, items, rollout) -> tuple[RoundPairs, dict]:
        samples = [r[0] for r in rollout.responses]
        ended = [e[0] for e in rollout.ended]
        keep = [i for i, it in enumerate(items)
                if not (self.cfg.algorithm.drop_identical_pairs and samples[i] == it.response_ids)]
        scores = self.score(items, samples)
        judged = RoundPairs(
            Pairs([items[i].prompt_ids for i in keep], [items[i].response_ids for i in keep], [samples[i] for i in keep]),
            [items[i].example.origin for i in keep],
            [None] * len(keep), [scores[i] if scores else None for i in keep])
        metrics = {**_rollout_stats(samples, ended, scores), "rollout/identical_dropped": float(len(items) - len(keep)),
                   "rollout/pairs": float(len(keep))}
        if not keep:
            raise UserError(f"round: every one of {len(items)} samples equals its ground truth; nothing to learn from "
                            "(set algorithm.drop_identical_pairs=false to train on them anyway)")
        return judged, metrics

    # ---- mode online_dpo: n samples per prompt, best vs worst by reward -----------------------------------------------
    def online_dpo_round(self, t: int) -> dict:
        cfg = self.cfg
        steps = cfg.algorithm.ref_update_every
        if not self.workers.has_schedule():  # one schedule over the whole run; restored from the checkpoint on resume
            self.workers.start_schedule(online_dpo_total_steps(cfg))
        all_pairs: list[RoundPairs] = []
        last: dict = {}
        # refreshed at the end of the last round; the initial reference only until the first update
        self.policy_is_opponent = cfg.algorithm.reference == "refresh" or self.state.global_step == 0
        prompts = ties = 0
        rewards: list[float] = []
        for _ in tqdm(range(steps), desc=f"round {t + 1} steps", leave=False):
            picked = self.step_indices(self.state.global_step)
            items = [self.train_items[i] for i in picked]
            rollout = self.rollout(items, picked, self.sampling(n=cfg.rollout.n),
                                   seed_for(cfg, ONLINE_GENERATE, t, self.state.global_step), "generate")
            with self.timer("judge"):
                judged, rollout_metrics = self.judge_by_reward(items, rollout)
            all_pairs.append(judged)
            prompts += len(items)
            ties += int(rollout_metrics["rollout/ties_dropped"])
            rewards.append(rollout_metrics.get("rollout/reward_mean", 0.0))
            self.tracker.log(rollout_metrics, round=t + 1, step=self.state.global_step + 1, kind="rollout")
            if len(judged.pairs) == 0:  # every prompt tied: no signal this step, but the step still counts
                self.state.global_step += 1
                self.workers.skip_step()
                log.warning("round %d, step %d: no pair formed: all %d prompts tied (their %d samples scored the "
                            "same, mean reward %.3f); the step trains nothing", t + 1, self.state.global_step,
                            len(items), cfg.rollout.n, rollout_metrics.get("rollout/reward_mean", 0.0))
                continue
            with self.timer("update"):  # each rank computes the reference's log-probs with its resident opponent
                last = {**rollout_metrics, **self.train_step(t, judged.pairs)}
        self.tracker.log({"rollout/round_tie_share": ties / max(prompts, 1)}, round=t + 1,
                         step=self.state.global_step, kind="health")  # one per round, beside the per-step rollouts
        if not any(len(j.pairs) for j in all_pairs):
            raise NoPairsError(self.no_pairs_message(t, prompts, sum(rewards) / max(len(rewards), 1)))
        if cfg.algorithm.reference == "refresh":
            self.workers.refresh_opponent()  # the improved policy becomes the next opponent
        self.write_pairs(t, RoundPairs(
            Pairs(*[sum((getattr(j.pairs, f) for j in all_pairs), []) for f in ("prompts", "chosen", "rejected")]),
            sum((j.origins for j in all_pairs), []), sum((j.chosen_scores for j in all_pairs), []),
            sum((j.rejected_scores for j in all_pairs), [])))
        return last

    def no_pairs_message(self, t: int, prompts: int, mean_reward: float) -> str:
        r = self.cfg.rollout
        return (f"round {t + 1}: no pair was formed in any of its {self.cfg.algorithm.ref_update_every} steps: for all "
                f"{prompts} prompts the {r.n} samples scored the same (mean reward {mean_reward:.3f}), so online DPO "
                f"cannot learn. Likely causes: a reward that never separates the samples (e.g. the strict GSM8K "
                f"answer format '#### <number>', which a model not trained on it never writes), too few samples per "
                f"prompt (rollout.n={r.n}), or a temperature too low to vary them (rollout.temperature={r.temperature})."
                f" Knobs: reward.gsm8k_method=flexible (the last number counts), reward.format_score=0.1 (a score for "
                f"a well-formed but wrong answer), a larger rollout.n, a higher rollout.temperature. Stopped; the checkpoints "
                f"of earlier rounds are kept in {RunDir(self.run_dir).checkpoints}")

    def judge_by_reward(self, items, rollout) -> tuple[RoundPairs, dict]:
        n = self.cfg.rollout.n
        samples, ended = rollout.flat()
        flat_items = [it for it in items for _ in range(n)]
        raw = self.score(flat_items, samples, required=True)
        scores = apply_missing_eos_penalty(raw, ended, self.cfg.algorithm.missing_eos_penalty)
        prompt_of = [i for i in range(len(items)) for _ in range(n)]  # pairing groups by prompt, never by position
        chosen = pair_by_reward(prompt_of, scores, min_margin=self.cfg.algorithm.min_reward_margin)
        # the SFT term only on a chosen answer the reward marks correct (raw reward > 0, before the EOS penalty)
        sft_mask = [float(raw[i] > 0) for i in chosen.chosen] if self.cfg.algorithm.sft_on_correct_only else None
        judged = RoundPairs(
            Pairs([items[p].prompt_ids for p in chosen.prompt_ids], [samples[i] for i in chosen.chosen],
                  [samples[i] for i in chosen.rejected], sft_mask=sft_mask),
            [items[p].example.origin for p in chosen.prompt_ids],
            [scores[i] for i in chosen.chosen], [scores[i] for i in chosen.rejected])
        metrics = {**_rollout_stats(samples, ended, raw), "rollout/ties_dropped": float(chosen.ties_dropped),
                   "rollout/tie_share": chosen.ties_dropped / max(len(items), 1), "rollout/pairs": float(len(chosen.chosen))}
        return judged, metrics

    # ---- shared pieces --------------------------------------------------------------------------------------------------
    def rollout(self, items, keys: list[int], sampling: SamplingParams, seed: int, desc: str):
        """``keys``: the items' positions in the training set, so a prompt's samples are the same whatever round
        batch, rank or world size it lands in."""
        with self.timer("generate"):
            rollout = self.workers.generate([it.prompt_ids for it in items], sampling, seed=seed, keys=keys, desc=desc)
        self.counts["rollout_tokens"] += sum(len(r) for rs in rollout.responses for r in rs)
        ended = [e for es in rollout.ended for e in es]
        cut = 1 - sum(ended) / max(len(ended), 1)
        if cut > CUT_WARNING_SHARE and not self.warned_cut:  # once per round: judged answers that were cut off
            self.warned_cut = True
            log.warning("%s: %.0f%% of the %d samples reached data.max_response_length=%d without an EOS, so they "
                        "are judged (and trained on) cut off. Raise data.max_response_length, or check that the "
                        "chat template ends answers with the tokenizer's EOS", desc, 100 * cut, len(ended),
                        self.cfg.data.max_response_length)
        return rollout

    def train_step(self, t: int, pairs: Pairs, ref: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        """`ref`: the reference's precomputed (chosen, rejected) log-probs; None: the ranks' resident opponent's."""
        settings = dataclasses.replace(self.loss_settings(t), reference_is_policy=self.policy_is_opponent)
        metrics = self.workers.update(pairs, settings, ref)
        self.counts["update_tokens"] += metrics["train/tokens"]
        if metrics["train/step_skipped"] == 0:
            self.counts["steps"] += 1
            self.counts["chosen_drift"] += metrics["logps/chosen"] - metrics["logps/ref_chosen"]
            self.counts["margins"] += metrics["rewards/margins"]
        self.state.global_step += 1
        if metrics.pop("train/params_non_finite") > 0:
            raise NonFiniteError(
                f"round {t + 1}, step {self.state.global_step}: the parameters are not finite after the optimizer step "
                f"(loss={metrics['loss']}, grad_norm={metrics['train/grad_norm']}, lr={metrics.get('train/lr')}). "
                f"Stopped without saving; the last complete checkpoint is kept in {RunDir(self.run_dir).checkpoints}. "
                "Try a lower actor.lr or model.dtype=float32")
        skipped = metrics.pop("train/step_skipped") > 0
        self.policy_is_opponent = self.policy_is_opponent and skipped
        self.state.skipped_steps += skipped
        self.bad_in_a_row = self.bad_in_a_row + 1 if skipped else 0
        metrics["train/skipped_steps"] = float(self.state.skipped_steps)
        self.tracker.log(metrics, round=t + 1, step=self.state.global_step)
        if self.bad_in_a_row > self.cfg.trainer.max_bad_steps:
            raise NonFiniteError(
                f"round {t + 1}, step {self.state.global_step}: {self.bad_in_a_row} steps in a row had a non-finite loss "
                f"or gradient norm (loss={metrics['loss']}, grad_norm={metrics['train/grad_norm']}), more than "
                f"trainer.max_bad_steps={self.cfg.trainer.max_bad_steps}. Stopped; the last complete checkpoint is kept "
                f"in {RunDir(self.run_dir).checkpoints}. Try a lower actor.lr, a larger algorithm.beta, or model.dtype=float32")
        return metrics

    def check_collapse(self, t: int) -> None:
        """SPIN's measured failure mode: margins grow while the chosen (ground-truth) response itself becomes less
        likely than under the opponent. Warn with the numbers and the knobs; stop if trainer.stop_on_collapse."""
        n = self.counts["steps"]
        if not n:
            return
        drift, margins = self.counts["chosen_drift"] / n, self.counts["margins"] / n
        collapsing = drift < -self.cfg.trainer.collapse_threshold and margins > 0
        self.tracker.log({"train/chosen_drift": drift, "train/collapse_warning": float(collapsing)}, round=t + 1,
                         step=self.state.global_step, kind="health")
        if not collapsing:
            return
        message = (f"round {t + 1}: the chosen responses' log-prob fell {-drift:.2f} nats below the opponent's on "
                   f"average while the reward margins grew ({margins:.3f}): the policy is pushing both answers down, "
                   f"which lowered accuracy in every measurement on small models. Counter it with the DPOP guard "
                   f"(algorithm.dpop_lambda=5), an SFT term (algorithm.sft_weight=1), a larger algorithm.beta, or a "
                   f"lower actor.lr (threshold: trainer.collapse_threshold={self.cfg.trainer.collapse_threshold})")
        if self.cfg.trainer.stop_on_collapse:
            raise CollapseError(message + f". Stopped (trainer.stop_on_collapse=true); the last good checkpoint is "
                                          f"kept in {RunDir(self.run_dir).checkpoints}")
        log.warning("%s", message)

    def loss_settings(self, t: int) -> LossSettings:
        a = self.cfg.algorithm
        beta = a.beta if isinstance(a.beta, (int, float)) else a.beta[t]  # a number, or one value per round
        # null: per-token means for ipo (as TRL and the IPO paper), sums for every other loss (as DPO)
        normalize = a.loss_type == "ipo" if a.length_normalize is None else a.length_normalize
        return LossSettings(beta=float(beta), loss_type=a.loss_type, label_smoothing=a.label_smoothing,
                            dpop_lambda=a.dpop_lambda, sft_weight=a.sft_weight, length_normalize=normalize)

    def sampling(self, n: int) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(n=n, max_new_tokens=self.cfg.data.max_response_length, temperature=r.temperature,
                              top_p=r.top_p, top_k=r.top_k)

    def round_indices(self, t: int) -> list[int]:
        """The round's prompts (positions in the training set): a seeded permutation, `data.prompts_per_round` of
        them."""
        k = self.cfg.data.prompts_per_round or len(self.train_items)
        order = list(range(len(self.train_items)))
        random.Random(seed_for(self.cfg, ROUND_PROMPTS, t)).shuffle(order)
        return order[:k]

    def step_indices(self, step: int) -> list[int]:
        """online_dpo: the step's prompts (positions in the training set), walking seeded epoch permutations."""
        b = self.cfg.trainer.train_batch_size
        n = len(self.train_items)
        return [self.epoch_order(pos // n)[pos % n] for pos in range(step * b, step * b + b)]

    @functools.lru_cache(maxsize=2)
    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.train_items)))
        random.Random(seed_for(self.cfg, EPOCH_ORDER, epoch)).shuffle(order)
        return order

    def with_history(self, t: int, pairs: Pairs) -> Pairs:
        """The paper trains iteration t on its own pairs and those of the previous iteration(s)."""
        out = Pairs(list(pairs.prompts), list(pairs.chosen), list(pairs.rejected))
        for past in range(max(0, t - self.cfg.algorithm.history_rounds), t):
            old = read_pairs(self.run_dir, past + 1)
            out.prompts += old.prompts
            out.chosen += old.chosen
            out.rejected += old.rejected
        return out

    def score(self, items, samples: list[list[int]], required: bool = False) -> list[float] | None:
        """Reward of each sample; in spin (required=False) only when every item has a ground truth."""
        if not required and any(it.example.ground_truth is None for it in items):
            return None
        return self.reward.score(items, self.tokenizer.batch_decode(samples, skip_special_tokens=True))

    def evaluate(self) -> dict:
        prompts = [it.prompt_ids for it in self.val_items]
        with self.timer("eval"):
            keys = list(range(len(prompts)))  # a val prompt's key is its position in the val set
            greedy = SamplingParams(max_new_tokens=self.cfg.data.max_response_length, greedy=True)
            rollout = self.workers.generate(prompts, greedy, seed=seed_for(self.cfg, EVAL_GREEDY), keys=keys, desc="eval")
            metrics = accuracy_metrics(self.val_items, [r[0] for r in rollout.responses], self.tokenizer, self.reward_fn)
            k = self.cfg.trainer.val_pass_k
            if k:  # the same seed every round: rounds are compared on the same random draws
                sampled = self.workers.generate(prompts, self.sampling(n=k), seed=seed_for(self.cfg, EVAL_SAMPLE),
                                                keys=keys, desc=f"eval pass@{k}")
                metrics.update(pass_at_k_metrics(self.val_items, sampled.responses, self.tokenizer, self.reward_fn, [k]))
            return metrics

    @contextmanager
    def timer(self, name: str):
        start = time.perf_counter()
        yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    # ---- run directory ----------------------------------------------------------------------------------------------
    def write_pairs(self, t: int, judged: RoundPairs) -> None:
        write_pairs(self.run_dir, t + 1, judged, self.tokenizer)
        k = self.cfg.trainer.log_samples  # what the model wrote this round, where the user already looks
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        p = judged.pairs
        self.tracker.log_samples([{"prompt": decode(p.prompts[i]), "chosen": decode(p.chosen[i]),
                                   "rejected": decode(p.rejected[i]), "chosen_score": judged.chosen_scores[i],
                                   "rejected_score": judged.rejected_scores[i]} for i in range(min(k, len(p)))],
                                 round=t + 1, step=self.state.global_step)

    def save(self, t: int, val: dict) -> None:
        start = next(({"val/acc": r["val_acc"]} for r in self.state.table
                      if r["round"] == "start" and r["val_acc"] is not None), None)

        def save_model(folder: Path) -> None:  # the HF folder, with its model card
            self.workers.save(folder, with_optimizer=self.mode == "online_dpo")
            write_model_card(folder, self.cfg, t + 1, val, start)

        save_checkpoint(self.run_dir, str(t + 1), save_model, self.state,
                        keep_last=self.cfg.trainer.keep_last_checkpoints)

    def save_table(self) -> None:
        """The round table also lives in a small JSON in the run directory, for people and tools."""
        write_round_table(self.run_dir, self.state.table)


def _rollout_stats(samples, ended, scores) -> dict:
    m = {"rollout/response_length": sum(map(len, samples)) / max(len(samples), 1),
         "rollout/eos_rate": sum(ended) / max(len(ended), 1)}
    if scores:
        m["rollout/reward_mean"] = sum(scores) / len(scores)
    return m


def _row(val: dict, train: dict) -> dict:
    return {"val_acc": val.get("val/acc"), "margins": train.get("rewards/margins"),
            "accuracies": train.get("rewards/accuracies"), "logps_chosen": train.get("logps/chosen"),
            "sample_reward": train.get("rollout/reward_mean")}
