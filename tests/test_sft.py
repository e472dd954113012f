"""Supervised fine-tuning: response-only labels, a loss that falls, determinism, and `spinlm sft` end to end."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from spinlm.config import load_config
from spinlm.errors import ConfigError
from spinlm.data.dataset import TokenizedExample, tokenize_examples
from spinlm.data.example import DataError, Example
from spinlm.sft import run_sft_from_config, sft_batch, train_sft
from spinlm.tasks.arith import generate_problems, to_rows
from spinlm.tasks.tiny_model import build_model, train_tokenizer

SMALL_MODEL = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def item(prompt_ids: list[int], response_ids: list[int]) -> TokenizedExample:
    ex = Example(prompt=[{"role": "user", "content": "q"}], response="r", origin="test:0")
    return TokenizedExample(example=ex, prompt_ids=prompt_ids, response_ids=response_ids, rejected_ids=None)


@pytest.fixture(scope="module")
def problems():
    return generate_problems(40, seed=2, max_steps=2, max_number=20)


@pytest.fixture(scope="module")
def tokenizer(problems):
    return train_tokenizer([f"{p['question']}\n{p['solution']}" for p in problems], vocab_size=300)


@pytest.fixture(scope="module")
def items(problems, tokenizer):
    examples = [Example(prompt=[{"role": "user", "content": p["question"]}], response=p["solution"],
                        data_source="tiny_arith", ground_truth=str(p["answer"]), origin=f"mem:{i}")
                for i, p in enumerate(problems)]
    out, _ = tokenize_examples(examples, tokenizer, max_prompt_length=96, max_response_length=48, truncation="error")
    return out


def test_batch_labels_cover_exactly_the_response_tokens():
    batch = sft_batch([item([5, 6, 7], [8, 1]), item([9], [10, 11, 1])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 1], [9, 10, 11, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 1], [-100, 10, 11, 1, -100]]


def test_prompt_positions_get_no_gradient_and_loss_is_response_mean(tokenizer):
    model = build_model(tokenizer, seed=0, **SMALL_MODEL)
    batch = sft_batch([item([2, 40, 41, 3], [50, 51, 1]), item([2, 42, 3], [52, 1])], tokenizer.pad_token_id)
    out = model(**batch)
    out.logits.retain_grad()
    out.loss.backward()
    # Position t predicts token t+1: only positions whose next token is a response token carry gradient.
    has_grad = out.logits.grad.abs().sum(-1) > 0
    assert has_grad.tolist() == [[False, False, False, True, True, True, False],
                                 [False, False, True, True, False, False, False]]
    # The loss is the mean cross-entropy over the 5 response targets (hand-picked positions).
    logp = F.log_softmax(out.logits.detach().float(), -1)
    targets = [(0, 3, 50), (0, 4, 51), (0, 5, 1), (1, 2, 52), (1, 3, 1)]
    expected = -sum(logp[b, t, tok] for b, t, tok in targets) / len(targets)
    assert torch.allclose(out.loss.detach(), expected, atol=1e-5)


def test_short_sft_lowers_the_loss(tokenizer, items):
    model = build_model(tokenizer, seed=0, **SMALL_MODEL)
    batch = sft_batch(items[:8], tokenizer.pad_token_id)
    with torch.no_grad():
        before = model(**batch).loss.item()
    losses = train_sft(model, tokenizer, items[:8], steps=40, batch_size=4, lr=5e-3, warmup_ratio=0.1, seed=0,
                       log_every=0)
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert len(losses) == 40
    assert after < 0.6 * before
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5])
    assert not model.training  # handed back ready for generation


def test_same_seed_gives_identical_weights(tokenizer, items):
    def trained(seed: int) -> dict[str, torch.Tensor]:
        model = build_model(tokenizer, seed=0, **SMALL_MODEL)
        train_sft(model, tokenizer, items, steps=4, batch_size=3, lr=1e-3, warmup_ratio=0.0, seed=seed,
                  log_every=0)
        return model.state_dict()

    a, b, c = trained(1), trained(1), trained(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Another seed draws other batches, hence other weights.
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_bad_arguments_are_named(tokenizer, items):
    model = build_model(tokenizer, seed=0, **SMALL_MODEL)
    with pytest.raises(ValueError, match="steps=0"):
        train_sft(model, tokenizer, items, steps=0, batch_size=2, lr=1e-3, warmup_ratio=0.0, seed=0)
    no_response = TokenizedExample(example=Example(prompt=[], origin="data.parquet:7"), prompt_ids=[2, 3],
                                   response_ids=None, rejected_ids=None)
    with pytest.raises(DataError, match="data.parquet:7: SFT needs a ground-truth response"):
        train_sft(model, tokenizer, [no_response], steps=1, batch_size=1, lr=1e-3, warmup_ratio=0.0, seed=0)


def _write(rows: list[dict], path) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_spinlm_sft_end_to_end(problems, tokenizer, tmp_path):
    model_dir = tmp_path / "init"
    build_model(tokenizer, seed=0, **SMALL_MODEL).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    train = _write(to_rows(problems[:30], "train"), tmp_path / "train.parquet")
    val = _write(to_rows(problems[30:], "val"), tmp_path / "val.parquet")
    cfg = load_config([f"model.path={model_dir}", f"data.train_files={train}", f"data.val_files={val}",
                       "sft.steps=5", "sft.batch_size=4", "sft.max_examples=12", f"trainer.output_dir={tmp_path}/run",
                       "trainer.device=cpu", "data.val_max_samples=6"])
    summary = run_sft_from_config(cfg)
    out = tmp_path / "run" / "sft"
    assert summary["output_dir"] == str(out) and summary["steps"] == 5
    assert set(summary) >= {"val/acc_before", "val/acc_after", "final_loss", "seconds"}
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out)("12+7", add_special_tokens=False)["input_ids"] \
        == tokenizer("12+7", add_special_tokens=False)["input_ids"]
    init = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert not torch.equal(init["model.norm.weight"], reloaded.state_dict()["model.norm.weight"])


def test_spinlm_sft_config_errors_name_the_key(problems, tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="model.path"):
        run_sft_from_config(load_config(["model.path=./no/such/model", "data.train_files=x.parquet"]))
    with pytest.raises(ConfigError, match=r"sft.steps=0.*\n.*sft.warmup_ratio=1.5"):
        run_sft_from_config(load_config(["sft.steps=0", "sft.warmup_ratio=1.5"]))

    # verl rows with no extra_info.answer have nothing to imitate: the error names file and row.
    model_dir = tmp_path / "init"
    build_model(tokenizer, seed=0, **SMALL_MODEL).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = [{"prompt": [{"role": "user", "content": p["question"]}], "data_source": "tiny_arith"}
            for p in problems[:3]]
    path = _write(rows, tmp_path / "prompts.parquet")
    with pytest.raises(DataError, match=r"prompts.parquet:0: SFT needs a ground-truth response"):
        run_sft_from_config(load_config([f"model.path={model_dir}", f"data.train_files={path}",
                                         "data.val_files=null", "trainer.device=cpu"]))


def _config_only_model(path) -> str:
    """A model folder with config.json and nothing else: loading it would fail, so a check that passes the config
    and still stops the command must have stopped it before any model loaded."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=256).save_pretrained(path)
    return str(path)


def test_spinlm_sft_checks_its_config_before_loading_anything(problems, tmp_path):
    model = _config_only_model(tmp_path / "model")
    train = _write(to_rows(problems[:4], "train"), tmp_path / "train.parquet")
    base = [f"model.path={model}", f"data.train_files={train}", f"trainer.output_dir={tmp_path}/run"]
    with pytest.raises(ConfigError) as err:
        run_sft_from_config(load_config(base + ["sft.stepz=5", "sft.lr=fast", "data.val_max_samples=0"]))
    assert err.value.problems == ["sft.stepz=5: unknown key; did you mean sft.steps?",
                                  "sft.lr=fast: expected a number (the default is 0.001)",
                                  "data.val_max_samples=0: must be null or >= 1"]
    assert not (tmp_path / "run").exists()  # nothing written


def test_spinlm_sft_command_prints_the_config_problem(problems, tmp_path, capsys):
    from spinlm.cli import main

    model = _config_only_model(tmp_path / "model")
    train = _write(to_rows(problems[:4], "train"), tmp_path / "train.parquet")
    code = main(["sft", f"model.path={model}", f"data.train_files={train}", f"trainer.output_dir={tmp_path}/run",
                 "sft.batch_size=0"])
    assert code == 2
    assert capsys.readouterr().err == "spinlm sft: error:\n- sft.batch_size=0: must be >= 1\n"


def test_sft_rules_are_not_the_training_rules(problems, tmp_path):
    from spinlm.config_check import check_config, check_sft_config

    model = _config_only_model(tmp_path / "model")
    train = _write(to_rows(problems[:4], "train"), tmp_path / "train.parquet")
    cfg = load_config([f"model.path={model}", f"data.train_files={train}", f"trainer.output_dir={tmp_path}/run",
                       "trainer.train_batch_size=7", "algorithm.mode=online_dpo", "trainer.logger=[console,wandbb]"])
    # batches, rollout.n and loggers are training's business: sft trains one model with its own sft.batch_size
    assert check_sft_config(cfg) == []
    assert len(check_config(cfg)) == 4  # and the generation budget, 512 + 512 tokens, is over the model's 256
    cfg.sft.warmup_ratio = float("nan")  # the shared reading of the tree still applies
    assert check_sft_config(cfg) == ["sft.warmup_ratio=.nan: must be a finite number (NaN and infinities are not "
                                     "allowed)"]
