"""The config check: one test per rule, each on a real config built with load_config and real files in tmp."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from spinlm.config import load_config
from spinlm.errors import ConfigError
from spinlm.config_check import ENUMS, check_config, validate
from spinlm.extras import install_hint

MAX_POSITIONS = 256  # the tiny model's context: smoke's 96 + 48 tokens fit, 200 + 100 do not


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("cfgcheck")
    model = root / "model"
    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS).save_pretrained(model)
    train = _write_jsonl(root / "train.jsonl", [
        {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]},
        {"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]},
    ])
    val = root / "val.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"prompt": [{"role": "user", "content": "4+4?"}], "data_source": "tiny_arith",
         "reward_model": {"ground_truth": "8"}},
    ]), val)
    prompts_only = _write_jsonl(root / "prompts.jsonl", [{"prompt": "3+3?"}])
    bad_json = root / "bad.jsonl"
    bad_json.write_text('{"messages": oops}\n', encoding="utf-8")
    no_config = root / "not_a_model"
    no_config.mkdir()
    a_file = root / "a_file.txt"
    a_file.write_text("x", encoding="utf-8")
    return {"root": root, "model": model, "train": train, "val": val, "prompts_only": prompts_only,
            "bad_json": bad_json, "no_config": no_config, "a_file": a_file}


def _base(files) -> list[str]:
    return ["preset=smoke", f"model.path={files['model']}", f"data.train_files={files['train']}",
            f"data.val_files={files['val']}", f"trainer.output_dir={files['root'] / 'out' / 'run'}"]


def problems_for(files, *overrides: str) -> list[str]:
    return check_config(load_config(_base(files) + list(overrides)))


def test_good_config_has_no_problems_and_creates_nothing(files):
    assert problems_for(files) == []
    validate(load_config(_base(files)))  # does not raise
    assert not (files["root"] / "out").exists()


def test_good_online_dpo_config_with_file_list_and_beta_schedule(files):
    assert problems_for(files, "algorithm.mode=online_dpo", "rollout.n=4",
                        f"data.train_files=[{files['train']},{files['prompts_only']}]",
                        "algorithm.beta=[0.1,5.0]", "algorithm.loss_type=ipo", "actor.lr=1") == []


def test_validate_raises_with_every_problem(files):
    with pytest.raises(ConfigError) as info:
        validate(load_config(_base(files) + ["algorithm.beta=-1", "trainer.rounds=0"]))
    assert info.value.problems == [
        "trainer.rounds=0: must be >= 1",
        "algorithm.beta=-1: must be > 0 (a number, or a list with one positive value per round)",
    ]


# ------------------------------------------------------------------------------------------------ tree rules

@pytest.mark.parametrize("override, expected", [
    ("trainer.round=3", "trainer.round=3: unknown key; did you mean trainer.rounds?"),
    ("algorithm.bta=0.2", "algorithm.bta=0.2: unknown key; did you mean algorithm.beta?"),
    ("actor.rounds=2", "actor.rounds=2: unknown key; did you mean trainer.rounds?"),
    ("trainr.rounds=2", "trainr.rounds=2: unknown key; did you mean trainer.rounds?"),
    ("qqqqqq=1", "qqqqqq=1: unknown key"),
])
def test_unknown_keys_with_suggestion(files, override, expected):
    assert problems_for(files, override) == [expected]


@pytest.mark.parametrize("override, expected", [
    ("actor.lr=abc", "actor.lr=abc: expected a number (the default is 5e-07)"),
    ("trainer.rounds=2.5", "trainer.rounds=2.5: expected an integer (the default is 3)"),
    ("model.trust_remote_code=1", "model.trust_remote_code=1: expected a boolean (true/false) (the default is false)"),
    ("trainer.logger=3", "trainer.logger=3: expected a list of strings (the default is [console, jsonl])"),
    ("data.prompts_per_round=some", "data.prompts_per_round=some: expected null or an integer"),
    ("algorithm.beta=[0.1,x]", "algorithm.beta=[0.1, x]: expected a number or a list of numbers (the default is 0.1)"),
    ("trainer=5", "trainer=5: expected a section with keys rounds, epochs_per_round, train_batch_size, seed, "
                  "output_dir, resume, allow_config_change, device, launcher, n_gpus_per_node, nnodes, cpu_workers, "
                  "log_every, eval_before_training, val_pass_k, keep_last_checkpoints, max_bad_steps, "
                  "collapse_threshold, stop_on_collapse, logger, log_samples, threads"),
    ("trainer.allow_config_change=yes please", "trainer.allow_config_change=yes please: expected a boolean "
                                               "(true/false) (the default is false)"),
])
def test_types(files, override, expected):
    assert problems_for(files, override) == [expected]


def test_int_is_accepted_where_a_float_is_expected(files):
    assert problems_for(files, "actor.lr=1", "rollout.temperature=2") == []


def test_mandatory_value_reported_once(files):
    cfg = load_config(_base(files))
    OmegaConf.update(cfg, "data.train_files", "???")
    OmegaConf.update(cfg, "model.path", "???")
    assert check_config(cfg) == ["model.path=???: must be set (a mandatory value with no default)",
                                 "data.train_files=???: must be set (a mandatory value with no default)"]


def test_unresolvable_interpolation_names_the_key(files, monkeypatch):
    monkeypatch.delenv("SPINLM_TEST_UNSET_VAR", raising=False)
    problems = problems_for(files, "model.path=${oc.env:SPINLM_TEST_UNSET_VAR}/m")
    assert len(problems) == 1
    assert problems[0].startswith("model.path=${oc.env:SPINLM_TEST_UNSET_VAR}/m: cannot resolve")
    assert "SPINLM_TEST_UNSET_VAR" in problems[0].split(": cannot resolve")[1]
    monkeypatch.setenv("SPINLM_TEST_UNSET_VAR", str(files["model"].parent))
    assert problems_for(files, "model.path=${oc.env:SPINLM_TEST_UNSET_VAR}/model") == []


def test_missing_key_is_reported(files):
    cfg = load_config(_base(files))
    del cfg.trainer["log_every"]
    assert check_config(cfg) == ["trainer.log_every: missing from the config (the packaged default is 10)"]


# ------------------------------------------------------------------------------------------------ enums

@pytest.mark.parametrize("key", sorted(ENUMS))
def test_enums(files, key):
    choices = ENUMS[key]
    problems = problems_for(files, f"{key}=zzz")
    assert problems == [f"{key}=zzz: must be one of {', '.join(choices)}"]


def test_enum_did_you_mean_and_logger_entries(files):
    assert problems_for(files, "algorithm.mode=online-dpo", "rollout.n=2") == [
        "algorithm.mode=online-dpo: must be one of spin, online_dpo; did you mean online_dpo?"]
    assert problems_for(files, "trainer.logger=[console,tensorbord]") == [
        "trainer.logger[1]=tensorbord: must be one of console, jsonl, tensorboard, wandb, mlflow; "
        "did you mean tensorboard?"]
    not_installed = [n for n in ("tensorboard", "wandb", "mlflow") if importlib.util.find_spec(n) is None]
    assert problems_for(files, "trainer.logger=[console,jsonl,tensorboard,wandb,mlflow]") == [
        f"trainer.logger contains {n}: its library is not installed (pip install {n})" for n in not_installed]


def test_all_enum_values_are_accepted(files):
    for key, choices in ENUMS.items():
        for choice in choices:
            extra = ["rollout.n=2"] if choice == "online_dpo" else []
            found = [p for p in problems_for(files, f"{key}={choice}", *extra) if "must be one of" in p]
            assert found == [], (key, choice)


# ------------------------------------------------------------------------------------------------ beta, mode

@pytest.mark.parametrize("beta, expected", [
    ("-1", ["algorithm.beta=-1: must be > 0 (a number, or a list with one positive value per round)"]),
    ("0", ["algorithm.beta=0: must be > 0 (a number, or a list with one positive value per round)"]),
    ("[0.1,0.1,5.0]", ["algorithm.beta=[0.1, 0.1, 5.0]: a list needs one value per round: 3 value(s) for "
                       "trainer.rounds=2"]),
    ("[0.1,-2]", ["algorithm.beta=[0.1, -2]: algorithm.beta[1]=-2 must be > 0 (a number, or a list with one "
                  "positive value per round)"]),
    ("[0.1,5]", []),
    ("0.5", []),
])
def test_beta(files, beta, expected):
    assert problems_for(files, f"algorithm.beta={beta}") == expected


def test_online_dpo_needs_two_samples(files):
    assert problems_for(files, "algorithm.mode=online_dpo", "rollout.n=1") == [
        "rollout.n=1: algorithm.mode=online_dpo needs rollout.n >= 2 (each pair is the best vs the worst of n "
        "samples of the same prompt)"]
    assert problems_for(files, "rollout.n=0") == ["rollout.n=0: must be >= 1"]
    assert problems_for(files, "algorithm.mode=online_dpo", "rollout.n=0") == ["rollout.n=0: must be >= 1"]
    assert problems_for(files, "algorithm.mode=online_dpo", "rollout.n=2") == []


def test_sft_loss_needs_an_sft_weight(files):
    assert problems_for(files, "algorithm.loss_type=sft") == [
        "algorithm.sft_weight=0.0: algorithm.loss_type=sft trains only the SFT term, so it needs algorithm.sft_weight > 0"]
    assert problems_for(files, "algorithm.loss_type=sft", "algorithm.sft_weight=1") == []


def test_verifiable_reward_options(files):
    assert problems_for(files, "algorithm.sft_on_correct_only=true") == [
        "algorithm.sft_on_correct_only=true: selects which chosen responses the SFT term trains on, but "
        "algorithm.sft_weight=0 turns that term off; set algorithm.sft_weight > 0"]
    assert problems_for(files, "algorithm.reference=initial", "model.lora.rank=4") == [
        "algorithm.reference=initial: not supported with LoRA (model.lora.rank=4), whose reference is the base model "
        "that each round's merge updates; use algorithm.reference=refresh, or full fine-tuning (model.lora.rank=0)"]
    assert problems_for(files, "algorithm.mode=online_dpo", "rollout.n=8", "algorithm.min_reward_margin=1",
                        "algorithm.sft_on_correct_only=true", "algorithm.sft_weight=1",
                        "algorithm.reference=initial") == []


# ------------------------------------------------------------------------------------------------ ranges

@pytest.mark.parametrize("key, bad, rule, good", [
    ("algorithm.label_smoothing", "0.5", "in [0, 0.5)", "0.49"),
    ("algorithm.label_smoothing", "-0.1", "in [0, 0.5)", "0"),
    ("algorithm.dpop_lambda", "-0.5", ">= 0", "0"),
    ("algorithm.sft_weight", "-1", ">= 0", "0"),
    ("algorithm.history_rounds", "-1", ">= 0", "0"),
    ("algorithm.ref_update_every", "0", ">= 1", "1"),
    ("algorithm.min_reward_margin", "-0.5", ">= 0", "1"),
    ("rollout.temperature", "0", "> 0", "0.01"),
    ("rollout.top_p", "0", "in (0, 1]", "1.0"),
    ("rollout.top_p", "1.5", "in (0, 1]", "0.9"),
    ("rollout.top_k", "-1", ">= 0", "0"),
    ("rollout.batch_size", "0", ">= 1", "1"),
    ("rollout.gpu_memory_utilization", "0", "in (0, 1]", "0.5"),
    ("actor.lr", "0", "> 0", "1e-6"),
    ("actor.warmup_ratio", "1.0", "in [0, 1)", "0"),
    ("actor.grad_clip", "0", "> 0", "0.5"),
    ("trainer.rounds", "0", ">= 1", "1"),
    ("trainer.epochs_per_round", "0", ">= 1", "2"),
    ("trainer.log_every", "0", ">= 1", "1"),
    ("trainer.keep_last_checkpoints", "0", "null or >= 1", "1"),
    ("trainer.max_bad_steps", "-1", ">= 0", "0"),
    ("data.max_prompt_length", "0", ">= 1", "16"),
    ("data.max_response_length", "-4", ">= 1", "16"),
    ("sft.steps", "0", ">= 1", "1"),
    ("sft.batch_size", "0", ">= 1", "1"),
    ("sft.lr", "-1e-3", "> 0", "1e-3"),
    ("sft.warmup_ratio", "1", "in [0, 1)", "0.5"),
    ("sft.max_examples", "0", "null or >= 1", "null"),
])
def test_ranges(files, key, bad, rule, good):
    shown = {"-1e-3": "-0.001"}.get(bad, bad)
    assert problems_for(files, f"{key}={bad}") == [f"{key}={shown}: must be {rule}"]
    assert problems_for(files, f"{key}={good}") == []


# ------------------------------------------------------------------------------------------------ batch sizes

def test_train_batch_must_divide_by_micro_batch_times_world(files):
    assert problems_for(files, "trainer.train_batch_size=30") == [
        "trainer.train_batch_size=30: must be divisible by actor.micro_batch_size x world size = 8 x 1 = 8 "
        "(world size = trainer.cpu_workers = 1)"]
    assert problems_for(files, "trainer.cpu_workers=2") == []  # 16 = 8 x 2
    assert problems_for(files, "trainer.cpu_workers=3") == [
        "trainer.train_batch_size=16: must be divisible by actor.micro_batch_size x world size = 8 x 3 = 24 "
        "(world size = trainer.cpu_workers = 3)"]
    assert any("world size = trainer.nnodes x trainer.n_gpus_per_node = 3 x 1" in p for p in problems_for(
        files, "trainer.nnodes=3", "trainer.n_gpus_per_node=1"))


def test_nonpositive_batch_sizes_are_range_problems_not_crashes(files):
    assert problems_for(files, "actor.micro_batch_size=0") == ["actor.micro_batch_size=0: must be >= 1"]
    assert problems_for(files, "trainer.train_batch_size=0") == ["trainer.train_batch_size=0: must be >= 1"]


# ------------------------------------------------------------------------------------------------ model, lengths

def test_lengths_must_fit_the_model_context(files):
    assert problems_for(files, "data.max_prompt_length=200", "data.max_response_length=100") == [
        f"data.max_prompt_length + data.max_response_length = 200 + 100 = 300: must be <= the model's "
        f"max_position_embeddings=256 (from {files['model']}/config.json)"]
    assert problems_for(files, "data.max_prompt_length=200", "data.max_response_length=56") == []


def test_lengths_read_n_positions_of_gpt2_style_configs(files, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 128}))
    assert problems_for(files, f"model.path={tmp_path}") == [
        f"data.max_prompt_length + data.max_response_length = 96 + 48 = 144: must be <= the model's "
        f"n_positions=128 (from {tmp_path}/config.json)"]


def test_model_path_problems(files, tmp_path):
    missing = tmp_path / "no_such_model"
    assert problems_for(files, f"model.path={missing}") == [f"model.path={missing}: no such directory"]
    assert problems_for(files, "model.path=./no/such/model") == ["model.path=./no/such/model: no such directory"]
    assert problems_for(files, f"model.path={files['no_config']}") == [
        f"model.path={files['no_config']}: the directory has no config.json, so it is not a Hugging Face model "
        "directory"]
    assert problems_for(files, f"model.path={files['a_file']}") == [
        f"model.path={files['a_file']}: is a file; expected a Hugging Face model directory (with config.json)"]
    (tmp_path / "config.json").write_text("{not json")
    found = problems_for(files, f"model.path={tmp_path}")
    assert len(found) == 1 and found[0].startswith(f"model.path={tmp_path}: cannot read {tmp_path}/config.json")


def test_hub_ids_must_be_cached_or_the_hub_reachable(files, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)  # so that no local 'org/name' folder exists
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # a hub nobody answers for
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    (problem,) = problems_for(files, "model.path=SomeOrg/some-model-0.5B")
    assert problem.startswith("model.path=SomeOrg/some-model-0.5B: not a local folder and not in the Hugging Face "
                              "cache, and the hub (127.0.0.1) cannot be reached")
    assert problems_for(files, "model.tokenizer_path=SomeOrg/tok")[0].startswith("model.tokenizer_path=SomeOrg/tok: ")
    # downloaded before (the hub cache's own layout): transformers loads it from there, nothing to report
    repo = cache / "models--SomeOrg--some-model-0.5B"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    assert problems_for(files, "model.path=SomeOrg/some-model-0.5B") == []


# ------------------------------------------------------------------------------------------------ data files

def test_data_files_are_checked(files, tmp_path):
    missing = tmp_path / "missing.parquet"
    assert problems_for(files, f"data.train_files={missing}") == [f"data.train_files: {missing}: file not found"]
    assert problems_for(files, f"data.val_files={missing}") == [f"data.val_files: {missing}: file not found"]
    found = problems_for(files, f"data.train_files=[{files['train']},{files['bad_json']}]")
    assert found == [f"data.train_files[1]: {files['bad_json']}: line 1: invalid JSON "
                     "(Expecting value at column 14)"]
    found = problems_for(files, "data.format=verl")
    assert len(found) == 1 and found[0].startswith(f"data.train_files: {files['train']}: data.format=verl needs")


def test_spin_needs_a_ground_truth_response_in_the_training_files(files):
    found = problems_for(files, f"data.train_files={files['prompts_only']}")
    assert len(found) == 1
    assert found[0].startswith(f"data.train_files: {files['prompts_only']}: algorithm.mode=spin needs a "
                               "ground-truth response per prompt")
    assert problems_for(files, f"data.train_files={files['prompts_only']}", "algorithm.mode=online_dpo",
                        "rollout.n=2") == []


def test_val_files_may_be_null(files):
    assert problems_for(files, "data.val_files=null") == []


# ------------------------------------------------------------------------------------------------ output dir

def test_output_dir_under_a_file_is_a_problem(files):
    target = files["a_file"] / "run"
    assert problems_for(files, f"trainer.output_dir={target}") == [
        f"trainer.output_dir={target}: cannot be a directory: its nearest existing parent {files['a_file']} "
        "is a file"]
    assert problems_for(files, f"sft.output_dir={target}") == [
        f"sft.output_dir={target}: cannot be a directory: its nearest existing parent {files['a_file']} is a file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere, so os.access cannot refuse")
def test_output_dir_not_writable(files, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert problems_for(files, f"trainer.output_dir={locked / 'run'}") == [
            f"trainer.output_dir={locked / 'run'}: not writable: this user cannot write to its nearest existing "
            f"parent {locked}"]
    finally:
        locked.chmod(0o700)


# ------------------------------------------------------------------------------------------------ reward

def test_custom_reward_is_checked(files, tmp_path):
    good = tmp_path / "my_reward.py"
    good.write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                    "    return float(solution_str.strip() == ground_truth)\n")
    assert problems_for(files, f"reward.custom_path={good}") == []
    assert problems_for(files, f"reward.custom_path={good}", "reward.custom_name=score") == [
        f"reward.custom_name='score': {good} has no function of that name"]
    missing = tmp_path / "nope.py"
    assert problems_for(files, f"reward.custom_path={missing}") == [
        f"reward.custom_path={str(missing)!r}: file not found"]


# ------------------------------------------------------------------------------------------------ GPUs

def test_gpu_requests_are_checked_against_visible_gpus(files):
    import torch

    visible = torch.cuda.device_count()
    want = visible + 1
    found = problems_for(files, f"trainer.n_gpus_per_node={want}", f"trainer.train_batch_size={8 * want}")
    assert found == [f"trainer.n_gpus_per_node={want}: this machine has only {visible} visible GPU(s) "
                     "(torch.cuda.device_count(); see CUDA_VISIBLE_DEVICES)"]
    expected = [] if visible else [
        "trainer.device=cuda: no CUDA GPU is visible on this machine (torch.cuda.device_count()=0)"]
    assert problems_for(files, "trainer.device=cuda") == expected


def test_cpu_device_with_gpus_or_flash_attention(files):
    assert problems_for(files, "trainer.device=cpu", "trainer.n_gpus_per_node=1") == [
        "trainer.n_gpus_per_node=1: trainer.device=cpu uses no GPU (set n_gpus_per_node=0, or device=cuda)"]
    assert problems_for(files, "trainer.device=cpu", "model.attn_implementation=flash_attention_2") == [
        "model.attn_implementation=flash_attention_2: needs a CUDA GPU, but trainer.device=cpu (use sdpa or eager)"]


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_without_the_package(files):
    assert problems_for(files, "model.attn_implementation=flash_attention_2") == [
        "model.attn_implementation=flash_attention_2: the flash-attn package is not installed (pip install flash-attn, "
        "or use auto / sdpa)"]
    assert problems_for(files, "model.attn_implementation=auto") == []


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_engine_without_the_package(files):
    assert problems_for(files, "rollout.engine=vllm") == [
        f'rollout.engine=vllm: the vllm package is not installed ({install_hint("vllm")} on a CUDA machine; on CPU '
        'see scripts/setup_vllm_env.sh), or use rollout.engine=hf']


def test_all_problems_at_once(files):
    found = problems_for(files, "algorithm.beta=-1", "rollout.n=1", "algorithm.mode=online_dpo", "trainer.round=3",
                         "actor.lr=abc", "trainer.train_batch_size=30")
    assert [p.split(":")[0] for p in found] == [
        "trainer.round=3", "actor.lr=abc", "algorithm.beta=-1", "rollout.n=1", "trainer.train_batch_size=30"]


def test_keys_the_mode_ignores_are_named():
    from spinlm.config_check import ignored_key_warnings

    assert ignored_key_warnings(load_config(["preset=smoke"])) == []  # a preset's own values are not the user's
    assert ignored_key_warnings(load_config(["preset=smoke", "rollout.n=4", "algorithm.missing_eos_penalty=1"])) == [
        "rollout.n=4 is ignored in algorithm.mode=spin (only online_dpo reads it)",
        "algorithm.missing_eos_penalty=1 is ignored in algorithm.mode=spin (only online_dpo reads it)"]
    assert ignored_key_warnings(load_config(["preset=smoke", "algorithm.mode=online_dpo", "rollout.n=4",
                                             "algorithm.history_rounds=2"])) == [
        "algorithm.history_rounds=2 is ignored in algorithm.mode=online_dpo (only spin reads it)"]


# ------------------------------------------------------------------------------------------------ non-finite numbers

def _float_keys() -> list[str]:
    """Every key that takes a number (its default is a float, or its type override says so)."""
    from spinlm.config import default_config
    from spinlm.config import flatten
    from spinlm.config_check import _kinds_of_default

    leaves = flatten(OmegaConf.to_container(default_config(), resolve=False))
    return [k for k, d in leaves.items() if {"float", "list[float]"} & set(_kinds_of_default(k, d))]


def test_every_float_key_is_enumerated():
    keys = _float_keys()
    assert {"actor.lr", "actor.grad_clip", "trainer.collapse_threshold", "algorithm.beta", "eval.temperature"} <= set(keys)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("key", _float_keys())
def test_every_float_key_rejects_nan_and_infinities(files, key, value):
    """A range rule compares false with NaN, so before this rule actor.grad_clip=.nan passed every check."""
    from spinlm.config import default_config
    from spinlm.config_check import _kinds_of_default

    if "float" not in _kinds_of_default(key, OmegaConf.select(default_config(), key)):
        value = f"[{value}]"  # a key that takes only a list of numbers (actor.betas)
    expected = f"{key}={value}: must be a finite number (NaN and infinities are not allowed)"
    assert expected in problems_for(files, f"{key}={value}")


def test_a_non_finite_entry_of_a_beta_list_is_rejected(files):
    assert problems_for(files, "trainer.rounds=2", "algorithm.beta=[0.1,.nan]") == [
        "algorithm.beta=[0.1, .nan]: must be a finite number (NaN and infinities are not allowed)"]
