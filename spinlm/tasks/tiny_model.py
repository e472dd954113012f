"""A home-made tokenizer and a ~1M-parameter Llama for the bundled task: no hub download needed.

A Llama config (not qwen2): with model_type qwen2, transformers 5.x's AutoTokenizer swaps a saved custom
tokenizer for Qwen2Tokenizer on reload, which splits digits differently.
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, EOS = "<pad>", "</s>"
ROLE_TOKENS = ["<|user|>", "<|assistant|>", "<|system|>"]
SPECIAL_TOKENS = [PAD, EOS, *ROLE_TOKENS]

# Each message as <|role|>content\n; the generation prompt is <|assistant|>, and the model ends its answer with EOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + ': expected system, user or assistant') }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``texts``; every digit is its own token, so numbers are spelled digit by digit."""
    if not texts:
        raise ValueError("train_tokenizer: texts is empty; expected the training corpus")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, additional_special_tokens=ROLE_TOKENS,
        padding_side="left", chat_template=CHAT_TEMPLATE,
    )


def build_model(tokenizer, *, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                intermediate_size: int = 384, max_position_embeddings: int = 256, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama sized for the tokenizer (tied embeddings: ~0.9M parameters by default)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None or pad is None:
        raise ValueError("build_model: the tokenizer needs eos_token and pad_token set")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
        # No BOS token in this vocabulary: like GPT-2, let EOS double as BOS.
        bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
    )
    # A private RNG stream: the same seed gives the same weights without touching the caller's global state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = eos
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    return model
