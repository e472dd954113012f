"""Reward models: a tiny sequence-classification model built from a config, scoring in batches what it scores one
by one, weighted with the rule reward, and judging an online-DPO round."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from spinlm.config import load_config
from spinlm.config_check import check_config
from spinlm.data.formats import load_examples
from spinlm.errors import UserError
from spinlm.data.items import load_val_items
from spinlm.main_spin import run
from spinlm.rewards import get_reward_fn
from spinlm.rewards.reward_model import RewardModel, WeightedReward
from spinlm.modeling import load_tokenizer

PROMPTS = [[{"role": "user", "content": "What is 2+3?"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Noah has 17 coins. He uses 10."}],
           [{"role": "user", "content": "1?"}]]
RESPONSES = ["5", "17-10=7.\n#### 7", "It is one, as far as anyone can tell from the question."]


@pytest.fixture(scope="module")
def reward_model_dir(tiny_task, tmp_path_factory):
    """A random 2-layer Llama reward model (num_labels=1) with the tiny task's tokenizer and chat template."""
    tok = AutoTokenizer.from_pretrained(tiny_task / "tokenizer")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("rm") / "reward_model"
    LlamaForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_batched_scores_equal_a_plain_forward_of_each_sample(reward_model_dir):
    rm = RewardModel(str(reward_model_dir), device="cpu", batch_size=2)
    batched = rm.score(PROMPTS, RESPONSES)
    plain = LlamaForSequenceClassification.from_pretrained(reward_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(reward_model_dir)
    for p, r, got in zip(PROMPTS, RESPONSES, batched):
        text = tok.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=False)
        assert text.endswith(f"<|assistant|>{r}\n")  # the reward model's own template renders the pair
        with torch.no_grad():
            alone = plain(input_ids=torch.tensor([tok(text, add_special_tokens=False).input_ids])).logits[0, 0]
        assert got == pytest.approx(float(alone), abs=1e-5)
    assert len(set(batched)) == 3  # a random model still tells the samples apart


def test_weighted_reward_adds_rule_and_model_scores(reward_model_dir, tiny_task):
    cfg = load_config(["preset=smoke", "data.val_max_samples=2"])
    items = load_val_items(cfg.data, load_tokenizer(str(tiny_task / "sft_model")))
    texts = [f"so #### {items[0].example.ground_truth}", "so #### -1"]  # rule reward 1, then 0
    rm = RewardModel(str(reward_model_dir), device="cpu")
    model_scores = rm.score([it.example.prompt for it in items], texts)
    combined = WeightedReward(get_reward_fn(cfg.reward), rm, rule_weight=2.0, model_weight=0.5).score(items, texts)
    assert combined == pytest.approx([2.0 + 0.5 * model_scores[0], 0.0 + 0.5 * model_scores[1]], abs=1e-6)

    def no_rule(**kw):
        raise AssertionError("a zero rule weight must not call the rule reward")

    assert WeightedReward(no_rule, rm, rule_weight=0.0).score(items, texts) == pytest.approx(model_scores, abs=1e-6)
    assert WeightedReward(get_reward_fn(cfg.reward), None).score(items, texts) == [1.0, 0.0]  # the rule alone


def test_online_dpo_judged_by_the_reward_model(reward_model_dir, tiny_task, tmp_path):
    run(load_config(["preset=smoke", f"trainer.output_dir={tmp_path / 'run'}", "trainer.eval_before_training=false",
                     "algorithm.mode=online_dpo", "rollout.n=2", "trainer.rounds=1", "data.max_response_length=24",
                     "data.truncation=right", f"reward.model_path={reward_model_dir}", "reward.weights.rule=0"]))
    pairs = pq.read_table(tmp_path / "run" / "rounds" / "1" / "pairs.parquet").to_pylist()
    assert pairs
    examples = {e.origin: e for e in load_examples(str(tiny_task / "train.parquet"))[0]}
    rm = RewardModel(str(reward_model_dir), device="cpu")
    for side in ("chosen", "rejected"):
        expected = rm.score([examples[p["origin"]].prompt for p in pairs], [p[side] for p in pairs])
        assert [p[f"{side}_score"] for p in pairs] == pytest.approx(expected, abs=1e-4)
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)  # best vs worst by the reward model


def test_reward_model_config_problems(reward_model_dir, tiny_task, tmp_path):
    base = ["preset=smoke", f"trainer.output_dir={tmp_path}"]
    assert check_config(load_config([*base, "reward.weights.rule=0"])) == [
        "reward.weights.rule=0: with no reward.model_path there would be no reward at all (set reward.model_path, "
        "or a non-zero rule weight)"]
    assert check_config(load_config([*base, f"reward.model_path={tmp_path}/none"])) == [
        f"reward.model_path={tmp_path}/none: no such directory"]
    assert check_config(load_config([*base, f"reward.model_path={reward_model_dir}", "reward.model_batch_size=0"])) \
        == ["reward.model_batch_size=0: must be >= 1"]
    with pytest.raises(UserError, match="num_labels=1"):
        RewardModel(str(tiny_task / "sft_model"), device="cpu")  # a causal LM is no reward model
