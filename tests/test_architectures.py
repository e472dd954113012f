"""spinlm on the model families users bring: Llama, Qwen2, Qwen3, Mistral and GPT-2, each a tiny random model built
from its config and saved with the bundled task's tokenizer, as a local Hugging Face folder."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, MistralConfig,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)

from spinlm.config import load_config
from spinlm.main_spin import run
from spinlm.pairs import Pairs
from spinlm.workers.dp_actor import LossSettings
from spinlm.workers.fsdp_workers import decoder_layers
from spinlm.modeling import load_tokenizer
from spinlm.workers.worker_group import LocalWorkerGroup
from spinlm.workers.logprobs import PACKED_SDPA, pack_sequences, packed_response_logps, use_packed_attention

DECODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128, max_position_embeddings=256)
CONFIGS = {
    "llama": lambda: LlamaConfig(**DECODER),
    "qwen2": lambda: Qwen2Config(**DECODER),
    "qwen3": lambda: Qwen3Config(**DECODER, head_dim=16),
    "mistral": lambda: MistralConfig(**DECODER, sliding_window=None),
    # learned absolute positions: the packed path must hand it position ids that restart per sequence
    "gpt2": lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls gain nothing from threads


def build_model(arch: str, vocab_size: int, eos: int, pad: int, seed: int = 0):
    config = CONFIGS[arch]()
    config.vocab_size = vocab_size
    config.bos_token_id, config.eos_token_id, config.pad_token_id = eos, eos, pad
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.generation_config.bos_token_id = model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    return model.float()


def save_model_dir(arch: str, tiny_task: Path, out: Path) -> Path:
    """A local HF folder as users have them: config, safetensors weights, generation config, tokenizer."""
    tok = AutoTokenizer.from_pretrained(tiny_task / "tokenizer")
    build_model(arch, len(tok), tok.eos_token_id, tok.pad_token_id).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _sequences() -> tuple[list[list[int]], list[list[int]]]:
    """Mixed lengths, so the short ones share packed rows with others (and start mid-row)."""
    gen = torch.Generator().manual_seed(3)
    shape = [(12, 8), (1, 1), (2, 3), (3, 1), (1, 2), (5, 4), (2, 2)]
    tokens = lambda n: torch.randint(5, 400, (n,), generator=gen).tolist()  # noqa: E731
    return [tokens(p) for p, _ in shape], [tokens(r) for _, r in shape]


@pytest.mark.parametrize("attn", ["sdpa", "eager", PACKED_SDPA])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_packed_logps_equal_a_plain_forward_per_sequence(arch, attn):
    model = build_model(arch, vocab_size=428, eos=1, pad=0)
    model.config._attn_implementation = "eager" if attn == "eager" else "sdpa"
    if attn == PACKED_SDPA:  # one causal call per packed sequence; every config here has no sliding window
        assert use_packed_attention(model) and model.config._attn_implementation == PACKED_SDPA
    model.eval()
    assert len(decoder_layers(model)) == 2  # what FSDP2 shards one by one
    prompts, responses = _sequences()
    batch = pack_sequences(prompts, responses, "cpu")
    assert batch.input_ids.shape[0] < len(prompts) - 2  # several sequences really share rows
    packed, _ = packed_response_logps(model, batch, chunk=5)
    packed.sum().backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    plain = []
    for p, r in zip(prompts, responses):  # each sequence alone: no padding, no mask, default positions
        ids = torch.tensor([p + r])
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])
        plain.append(logps[len(p) - 1 :].sum())
    plain = torch.stack(plain)
    plain.sum().backward()

    torch.testing.assert_close(packed, plain.detach().double(), atol=1e-5, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(g_packed[name], p.grad, atol=1e-5, rtol=0, msg=name)


def test_load_tokenizer_keeps_a_saved_custom_tokenizer_under_qwen2(tiny_task, tmp_path):
    """transformers 5's AutoTokenizer swaps a saved generic tokenizer for Qwen2Tokenizer under model_type qwen2 (NFC
    normalisation, another pre-tokenizer, an extra <|endoftext|>); spinlm loads the tokenizer.json it was given."""
    original = AutoTokenizer.from_pretrained(tiny_task / "tokenizer")
    folder = save_model_dir("qwen2", tiny_task, tmp_path / "qwen2")
    assert type(AutoTokenizer.from_pretrained(folder)).__name__ == "Qwen2Tokenizer"  # the swap this guards against
    tok = load_tokenizer(str(folder))
    text = "Cafe\u0301 has 12 cups.\n#### 12"  # a combining accent: NFC would merge it
    assert tok(text).input_ids == original(text).input_ids
    assert len(tok) == len(original) and tok.chat_template == original.chat_template
    assert (tok.eos_token, tok.pad_token, tok.padding_side) == ("</s>", "<pad>", "left")


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "gpt2"])
def test_one_spin_round_and_the_checkpoint_loads_in_plain_transformers(arch, tiny_task, tmp_path):
    folder = save_model_dir(arch, tiny_task, tmp_path / arch)
    run_dir = tmp_path / "run"
    table = run(load_config(["preset=smoke", f"model.path={folder}", f"trainer.output_dir={run_dir}",
                             "trainer.rounds=1", "trainer.eval_before_training=false", "data.prompts_per_round=16",
                             "trainer.train_batch_size=8", "data.val_max_samples=8", "data.max_response_length=24",
                             "data.truncation=right"]))
    assert [r["round"] for r in table] == [1]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert train and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)

    ckpt = run_dir / "checkpoints" / "1"
    trained = AutoModelForCausalLM.from_pretrained(ckpt)
    start = AutoModelForCausalLM.from_pretrained(folder)
    assert trained.config.model_type == arch and type(trained) is type(start)
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, start.state_dict()[n])]
    assert changed  # the round trained the weights that were saved
    # the tokenizer the run used, exactly (PreTrainedTokenizerFast reads tokenizer.json as saved, for every family)
    saved, original = PreTrainedTokenizerFast.from_pretrained(ckpt), AutoTokenizer.from_pretrained(tiny_task / "tokenizer")
    text = "Noah has 17 coins.\n#### 7"
    assert saved(text).input_ids == original(text).input_ids and saved.chat_template == original.chat_template


def test_policy_trains_without_dropout(tiny_task, tmp_path):
    """GPT-2's config has dropout 0.1. The opponent's log-probs are computed in eval mode, so at the first step (policy
    == opponent) the sigmoid loss must be exactly log 2, which dropout would break."""
    folder = save_model_dir("gpt2", tiny_task, tmp_path / "gpt2")
    cfg = load_config(["preset=smoke", f"model.path={folder}", f"trainer.output_dir={tmp_path / 'run'}"])
    group = LocalWorkerGroup(cfg, str(folder), keep_opponent=False)
    gen = torch.Generator().manual_seed(0)
    seq = lambda n: torch.randint(5, 400, (n,), generator=gen).tolist()  # noqa: E731
    pairs = Pairs([seq(6) for _ in range(8)], [seq(5) for _ in range(8)], [seq(4) for _ in range(8)])
    ref_c, ref_r = group.sequence_logps(pairs.prompts, pairs.chosen), group.sequence_logps(pairs.prompts, pairs.rejected)
    group.start_schedule(1)
    loss = group.update(pairs, LossSettings(beta=0.1), ref=(ref_c, ref_r))["loss"]
    assert loss == pytest.approx(math.log(2), abs=1e-6)
