"""verl's command line, understood: the override keys of verl's ``recipe/spin`` (its ``run_spin.sh`` and its
``spin_trainer.yaml`` on top of ``ppo_trainer.yaml``) mapped to spinlm's keys, in one table.

A verl key either maps to a spinlm key (its value converted where the conventions differ), or has no counterpart:
then it is accepted with a note when its value changes nothing here (PPO leftovers such as the KL controller), and
refused with the reason when it asks for something spinlm does not do. ``translate`` returns the spinlm overrides
and one line per verl key for the user; ``spinlm train`` prints those lines once, before the run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from spinlm.choices import LOGGERS, RESUME_MODES, ROLLOUT_ENGINES, TRUNCATION_MODES
from spinlm.run_dir import PAIRS_FILE, ROUNDS_DIR

# The top-level sections that exist only in verl: any key under them is a verl key (known to the table or refused).
VERL_ONLY_SECTIONS = ("actor_rollout_ref", "critic", "reward_model", "custom_reward_function", "ray_init")
# verl's trainer.logger names that spinlm has too (spinlm adds jsonl itself: the report reads it)
LOGGER_NAMES = tuple(name for name in LOGGERS if name != "jsonl")


class Refused(ValueError):
    """A verl value that asks for something spinlm does not do; the message says what to do instead."""


@dataclass(frozen=True)
class Rule:
    """target: the spinlm key (None: no counterpart). note: shown with the mapping, and as the reason when refused.
    convert: the verl value -> the spinlm value (may raise Refused). harmless: with no target, the values that change
    nothing here (accepted with the note); any other value is refused."""

    target: str | None
    note: str = ""
    convert: Callable[[Any], Any] | None = None
    harmless: Callable[[Any], bool] | None = None
    per_rank: bool = False  # verl's global micro-batch: divided by the world size (verl does the same)
    refusal: str = ""  # the reason a value that is not harmless is refused (default: the note)
    verl_form: Callable[[Any], bool] | None = None  # a key spinlm has too: only values in verl's form are translated


def _any(_value) -> bool:
    return True


def _falsy(value) -> bool:
    return value in (None, False, 0, "", "null", "none", "None")


def _at_most_one(value) -> bool:
    return value in (None, 1)


def _minus_one_is_null(value):
    return None if value == -1 else value


def _top_k(value):
    return 0 if value in (-1, None) else value  # verl: -1 is off; spinlm: 0 is off


def _rollout_name(value):
    if value in ROLLOUT_ENGINES:
        return value
    raise Refused(f"spinlm's rollout engines are {' and '.join(ROLLOUT_ENGINES)}, not {value!r}")


def _resume_mode(value):
    if value in RESUME_MODES:
        return value
    raise Refused("spinlm resumes from the run directory's last complete checkpoint (auto) or not at all (disable); "
                  "to start from a checkpoint, set actor_rollout_ref.model.path (model.path) to its HF folder")


def _logger(value):
    if value not in LOGGER_NAMES:
        raise Refused(f"spinlm logs to {', '.join(LOGGER_NAMES)} (and jsonl), not {value!r}")
    return [value, "jsonl"]  # metrics.jsonl feeds spinlm's report


def _ref_update_freq(value):
    if isinstance(value, int) and value >= 1:
        return value
    raise Refused("spinlm refreshes the opponent (verl's reference) every round; a reference that is never "
                  "refreshed (ref_update_freq <= 0) is not supported. Set a number of steps >= 1")


def _test_freq(value) -> bool:
    return isinstance(value, int) and value > 0


def _truncation(value):
    if value == "middle":
        raise Refused(f"spinlm truncates {' | '.join(TRUNCATION_MODES)}; middle is not supported")
    return value


def _not_megatron(value) -> bool:
    return value in ("fsdp", "fsdp2")


def _naive(value) -> bool:
    return value in (None, "naive")


_AR = "actor_rollout_ref."
_PPO = "a PPO setting verl's recipe/spin does not use"
_MICRO = "spinlm sizes log-prob passes from actor.micro_batch_size (2 x its pairs in sequences)"
_WARMUP = ("spinlm's warmup is a share of the run's steps: set actor_rollout_ref.actor.optim.lr_warmup_steps_ratio "
           "(actor.warmup_ratio) instead")
_STEPS = ("spinlm's run length is trainer.rounds (trainer.total_epochs) rounds; in online_dpo a round is "
          "algorithm.ref_update_every steps (trainer.ref_update_freq); set those instead")

VERL_KEYS: dict[str, Rule] = {
    # --- model ---
    _AR + "model.path": Rule("model.path"),
    _AR + "model.trust_remote_code": Rule("model.trust_remote_code"),
    _AR + "model.enable_gradient_checkpointing": Rule("model.gradient_checkpointing"),
    _AR + "model.lora_rank": Rule("model.lora.rank"),
    _AR + "model.lora_alpha": Rule("model.lora.alpha"),
    _AR + "model.target_modules": Rule("model.lora.target_modules"),
    _AR + "model.use_remove_padding": Rule(None, "spinlm always packs sequences without padding", harmless=_any),
    _AR + "model.use_shm": Rule(None, "spinlm loads the model from its path", harmless=_falsy),
    _AR + "hybrid_engine": Rule(None, "spinlm's rollout always shares the training weights", harmless=_any),
    # --- data ---
    "data.train_batch_size": Rule("trainer.train_batch_size",
                                  "prompts per optimizer step in online_dpo; pairs per step in spin"),
    "data.val_max_samples": Rule("data.val_max_samples", "-1 (all) becomes null", convert=_minus_one_is_null),
    "data.truncation": Rule("data.truncation", convert=_truncation),
    "data.prompt_key": Rule(None, "spinlm reads verl's `prompt` column (and other formats: data.format)",
                            harmless=lambda v: v == "prompt"),
    "data.reward_fn_key": Rule(None, "spinlm picks the built-in reward by `data_source`",
                               harmless=lambda v: v == "data_source"),
    "data.shuffle": Rule(None, "spinlm walks seeded permutations of the prompts (trainer.seed)", harmless=_any),
    "data.val_batch_size": Rule(None, "spinlm evaluates rollout.batch_size prompts per generate call", harmless=_any),
    "data.return_raw_chat": Rule(None, "spinlm applies the chat template itself", harmless=_any),
    "data.filter_overlong_prompts": Rule(None, "spinlm handles long prompts by data.truncation", harmless=_any),
    "data.dataloader_num_workers": Rule(None, "spinlm tokenizes the data once before the run", harmless=_any),
    # --- actor: optimizer and batches ---
    _AR + "actor.optim.lr": Rule("actor.lr"),
    _AR + "actor.optim.weight_decay": Rule("actor.weight_decay"),
    _AR + "actor.optim.betas": Rule("actor.betas"),
    _AR + "actor.optim.lr_warmup_steps_ratio": Rule("actor.warmup_ratio"),
    _AR + "actor.optim.lr_warmup_steps": Rule(None, "-1: no fixed warmup steps", harmless=lambda v: v in (None, -1, 0),
                                                      refusal=_WARMUP),
    _AR + "actor.optim.warmup_style": Rule("actor.lr_scheduler", "the schedule after warmup"),
    _AR + "actor.optim.lr_scheduler_type": Rule("actor.lr_scheduler", "the schedule after warmup"),
    _AR + "actor.optim.total_training_steps": Rule(None, "set by the trainer", harmless=lambda v: v in (None, -1),
                                                      refusal=_STEPS),
    _AR + "actor.grad_clip": Rule("actor.grad_clip"),
    _AR + "actor.ppo_micro_batch_size_per_gpu": Rule("actor.micro_batch_size", "pairs per forward/backward per rank"),
    _AR + "actor.ppo_micro_batch_size": Rule("actor.micro_batch_size", "global, so divided by the world size as verl "
                                             "does: pairs per forward/backward per rank", per_rank=True),
    _AR + "actor.ppo_mini_batch_size": Rule(None, "recipe/spin takes one optimizer step per data.train_batch_size "
                                                  "prompts, as spinlm does", harmless=_any),
    _AR + "actor.ppo_epochs": Rule(None, "one update per batch of pairs, as in recipe/spin", harmless=_at_most_one),
    _AR + "actor.use_dynamic_bsz": Rule(None, "for a token budget per micro-batch set "
                                              "actor.max_tokens_per_micro_batch", harmless=_falsy),
    _AR + "actor.ppo_max_token_len_per_gpu": Rule(None, "used by verl only with use_dynamic_bsz; spinlm's budget is "
                                                        "actor.max_tokens_per_micro_batch", harmless=_any),
    _AR + "actor.dpo_beta": Rule("algorithm.beta"),
    _AR + "actor.strategy": Rule(None, "spinlm shards with FSDP2; Megatron is not supported", harmless=_not_megatron),
    _AR + "actor.fsdp_config.param_offload": Rule(None, "spinlm keeps the policy on the device (CPU offload of the "
                                                        "online_dpo opponent: actor.opponent_offload)", harmless=_falsy),
    _AR + "actor.fsdp_config.optimizer_offload": Rule(None, "spinlm keeps the optimizer state on the device",
                                                      harmless=_falsy),
    _AR + "ref.fsdp_config.param_offload": Rule("actor.opponent_offload", "the frozen opponent (online_dpo) in CPU "
                                                "memory between its log-prob passes"),
    _AR + "actor.use_kl_loss": Rule(None, "spinlm's DPO loss has no extra KL term (the DPOP guard: "
                                          "algorithm.dpop_lambda)", harmless=_falsy),
    _AR + "actor.kl_loss_coef": Rule(None, _PPO, harmless=_any),
    _AR + "actor.kl_loss_type": Rule(None, _PPO, harmless=_any),
    _AR + "actor.entropy_coeff": Rule(None, _PPO, harmless=_any),
    _AR + "actor.clip_ratio": Rule(None, _PPO, harmless=_any),
    _AR + "actor.loss_agg_mode": Rule(None, _PPO, harmless=_any),
    _AR + "actor.ulysses_sequence_parallel_size": Rule(None, "spinlm has no sequence parallelism",
                                                       harmless=_at_most_one),
    # --- rollout ---
    _AR + "rollout.name": Rule("rollout.engine", convert=_rollout_name),
    _AR + "rollout.n": Rule("rollout.n", "samples per prompt (online_dpo needs >= 2)"),
    _AR + "rollout.temperature": Rule("rollout.temperature"),
    _AR + "rollout.top_p": Rule("rollout.top_p"),
    _AR + "rollout.top_k": Rule("rollout.top_k", "-1 (off) becomes 0", convert=_top_k),
    _AR + "rollout.gpu_memory_utilization": Rule("rollout.gpu_memory_utilization", "used by rollout.engine=vllm"),
    _AR + "rollout.enforce_eager": Rule("rollout.vllm_enforce_eager"),
    _AR + "rollout.free_cache_engine": Rule("rollout.vllm_sleep"),
    _AR + "rollout.tensor_model_parallel_size": Rule(None, "spinlm's rollout runs one model copy per rank (no "
                                                           "tensor parallelism)", harmless=_at_most_one),
    _AR + "rollout.log_prob_micro_batch_size": Rule(None, _MICRO, harmless=_any),
    _AR + "rollout.log_prob_micro_batch_size_per_gpu": Rule(None, _MICRO, harmless=_any),
    _AR + "ref.log_prob_micro_batch_size": Rule(None, _MICRO, harmless=_any),
    _AR + "ref.log_prob_micro_batch_size_per_gpu": Rule(None, _MICRO, harmless=_any),
    _AR + "rollout.prompt_length": Rule(None, "spinlm uses data.max_prompt_length", harmless=_any),
    _AR + "rollout.response_length": Rule(None, "spinlm generates up to data.max_response_length", harmless=_any),
    _AR + "rollout.dtype": Rule(None, "spinlm's rollout uses model.dtype", harmless=_any),
    _AR + "rollout.max_num_batched_tokens": Rule(None, "vLLM's own batching default applies", harmless=_any),
    _AR + "rollout.val_kwargs.n": Rule(None, "validation is greedy (val/acc); sampled pass@k: trainer.val_pass_k",
                                       harmless=_any),
    _AR + "rollout.val_kwargs.do_sample": Rule(None, "validation is greedy; sampled pass@k: trainer.val_pass_k",
                                               harmless=_falsy),
    _AR + "rollout.val_kwargs.temperature": Rule(None, "validation is greedy", harmless=_any),
    # --- reward ---
    "custom_reward_function.path": Rule("reward.custom_path"),
    "custom_reward_function.name": Rule("reward.custom_name"),
    "reward_model.enable": Rule(None, "spinlm uses a reward model when reward.model_path "
                                      "(reward_model.model.path) is set", harmless=_any),
    "reward_model.model.path": Rule("reward.model_path"),
    "reward_model.micro_batch_size_per_gpu": Rule("reward.model_batch_size"),
    "reward_model.max_length": Rule("reward.model_max_length"),
    "reward_model.reward_manager": Rule(None, "spinlm scores each sample with the reward function (verl's naive "
                                              "manager)", harmless=_naive),
    # --- algorithm ---
    "algorithm.dpo_beta": Rule("algorithm.beta"),
    "algorithm.dpo_loss_type": Rule("algorithm.loss_type"),
    "algorithm.dpo_label_smoothing": Rule("algorithm.label_smoothing"),
    "algorithm.adv_estimator": Rule(None, _PPO, harmless=_any),
    "algorithm.gamma": Rule(None, _PPO, harmless=_any),
    "algorithm.lam": Rule(None, _PPO, harmless=_any),
    "algorithm.kl_penalty": Rule(None, _PPO, harmless=_any),
    "algorithm.kl_ctrl.type": Rule(None, _PPO, harmless=_any),
    "algorithm.kl_ctrl.kl_coef": Rule(None, _PPO + " (read only with algorithm.use_kl_in_reward)", harmless=_any),
    "algorithm.kl_ctrl.horizon": Rule(None, _PPO, harmless=_any),
    "algorithm.kl_ctrl.target_kl": Rule(None, _PPO, harmless=_any),
    "algorithm.use_kl_in_reward": Rule(None, "spinlm's rewards have no KL penalty", harmless=_falsy),
    "algorithm.norm_adv_by_std_in_grpo": Rule(None, _PPO, harmless=_any),
    # --- trainer ---
    "trainer.ref_update_freq": Rule("algorithm.ref_update_every", "online_dpo: steps per round; the opponent "
                                    "(verl's reference) is refreshed after each round", convert=_ref_update_freq),
    "trainer.total_epochs": Rule("trainer.rounds", "a round: data.prompts_per_round prompts (spin) or "
                                 "algorithm.ref_update_every steps (online_dpo), not a pass over the data"),
    "trainer.total_training_steps": Rule(None, "null: from trainer.total_epochs", harmless=lambda v: v is None,
                                         refusal=_STEPS),
    "trainer.val_before_train": Rule("trainer.eval_before_training"),
    "trainer.test_freq": Rule(None, "spinlm evaluates after every round (data.val_files=null for no evaluation)",
                              harmless=_test_freq),
    "trainer.save_freq": Rule(None, "spinlm saves a checkpoint after every round (trainer.keep_last_checkpoints "
                                    "limits how many stay)", harmless=_any),
    "trainer.log_freq": Rule("trainer.log_every"),
    "trainer.logger": Rule("trainer.logger", "jsonl added: the report reads it", convert=_logger,
                           verl_form=lambda v: isinstance(v, str)),  # a list is spinlm's own form
    "trainer.project_name": Rule(None, "the W&B project / MLflow experiment is spinlm", harmless=_any),
    "trainer.experiment_name": Rule("trainer.output_dir", "the run directory outputs/<experiment_name>; W&B names "
                                    "the run after it", convert=lambda v: f"outputs/{v}"),
    "trainer.default_local_dir": Rule("trainer.output_dir", "the run directory (checkpoints/ inside it)"),
    "trainer.default_hdfs_dir": Rule(None, "spinlm writes checkpoints to trainer.output_dir only (no HDFS copy)",
                                     harmless=_falsy),
    "trainer.resume_mode": Rule("trainer.resume", convert=_resume_mode),
    "trainer.max_actor_ckpt_to_keep": Rule("trainer.keep_last_checkpoints"),
    "trainer.max_critic_ckpt_to_keep": Rule(None, "there is no critic", harmless=_any),
    "trainer.critic_warmup": Rule(None, "there is no critic", harmless=_falsy),
    "trainer.balance_batch": Rule(None, "spinlm sorts micro-batches by length itself", harmless=_any),
    "trainer.log_val_generations": Rule(None, f"every round's pairs are in {ROUNDS_DIR}/<t>/{PAIRS_FILE}",
                                        harmless=_any),
    "trainer.val_only": Rule(None, "for evaluation only, run `spinlm evaluate`", harmless=_falsy),
    "trainer.del_local_ckpt_after_load": Rule(None, "spinlm keeps its checkpoints", harmless=_falsy),
    "trainer.remove_previous_ckpt_in_save": Rule(None, "for fewer checkpoints set trainer.keep_last_checkpoints",
                                                 harmless=_falsy),
    "trainer.ray_wait_register_center_timeout": Rule(None, "spinlm waits for its Ray ranks itself", harmless=_any),
}
_NO_CRITIC = Rule(None, "recipe/spin has no critic", harmless=_any)  # any critic.* key


def _leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf, in the order the keys were given."""
    if isinstance(tree, dict) and tree:
        return [leaf for k, v in tree.items() for leaf in _leaves(v, f"{prefix}{k}.")]
    return [(prefix[:-1], tree)]


def is_verl_key(key: str, value: Any = None) -> bool:
    rule = VERL_KEYS.get(key)
    if rule is not None:
        return rule.verl_form is None or rule.verl_form(value)
    return key.split(".", 1)[0] in VERL_ONLY_SECTIONS


def strip_hydra_prefix(override: str) -> str:
    """Hydra's `+key=value` (add) and `++key=value` (add or override) mean key=value here."""
    return override.lstrip("+")


def same_in_spinlm(key: str, value: Any) -> bool:
    """A key both verl and spinlm have (data.val_max_samples) with a value that means the same in both: a plain
    spinlm override, nothing to translate or to say."""
    rule = VERL_KEYS.get(key)
    if rule is None or rule.target != key or rule.per_rank:
        return False
    try:
        return (rule.convert(value) if rule.convert else value) == value
    except Refused:
        return False


def translate(user: DictConfig, world_size: Callable[[DictConfig], int]) -> tuple[DictConfig, list[str]]:
    """The user's overrides with every verl key replaced by its spinlm key, and one line per verl key saying what
    became of it. `world_size(cfg)` gives the ranks of the overrides so far (for verl's global micro-batch).
    Raises ConfigError naming every verl key that asks for something spinlm does not do."""
    from spinlm.errors import ConfigError

    raw = OmegaConf.to_container(user, resolve=False)
    leaves = _leaves(raw)
    if not any(is_verl_key(k, v) and not same_in_spinlm(k, v) for k, v in leaves):
        return user, []
    out = OmegaConf.create()
    lines: list[str] = []
    problems: list[str] = []
    per_rank: list[tuple[str, Any]] = []
    for key, value in leaves:
        if not is_verl_key(key, value) or same_in_spinlm(key, value):
            OmegaConf.update(out, key, value, merge=True)
            continue
        rule = VERL_KEYS.get(key) or (_NO_CRITIC if key.startswith("critic.") else None)
        if rule is None:
            problems.append(f"{key}={value!r}: a verl key with no spinlm counterpart (the keys spinlm understands: "
                            "README, 'Coming from verl')")
            continue
        try:
            if rule.target is None:
                if not rule.harmless(value):
                    raise Refused(rule.refusal or rule.note)
                lines.append(f"{key}={value!r}: no counterpart, changes nothing here ({rule.note})")
                continue
            new = rule.convert(value) if rule.convert else value
        except Refused as exc:
            problems.append(f"{key}={value!r}: not supported: {exc}")
            continue
        if rule.per_rank:
            per_rank.append((key, new))
            continue
        OmegaConf.update(out, rule.target, new, merge=True)
        lines.append(f"{key}={value!r} -> {rule.target}={new!r}" + (f" ({rule.note})" if rule.note else ""))
    if problems:
        raise ConfigError(problems)
    for key, value in per_rank:  # after every other key: the world size comes from trainer.* given anywhere
        rule = VERL_KEYS[key]
        world = world_size(out)
        if not isinstance(value, int) or value % world:
            raise ConfigError([f"{key}={value!r}: a global micro-batch, must be divisible by the world size {world} "
                               f"(or set {key}_per_gpu)"])
        OmegaConf.update(out, rule.target, value // world, merge=True)
        lines.append(f"{key}={value!r} -> {rule.target}={value // world} ({rule.note}: {value} / {world})")
    if "mode" not in (raw.get("algorithm") or {}):
        lines.append("note: verl's recipe/spin is reward-ranked online DPO; add algorithm.mode=online_dpo and "
                     "actor_rollout_ref.rollout.n>=2 for that algorithm (without them: the paper's SPIN, chosen = "
                     "the ground truth)")
    return out, lines
