"""spinlm/modeling.py: where the tokenizer comes from, and clear errors for models that cannot load."""
from __future__ import annotations

import shutil

import pytest
from omegaconf import OmegaConf

from spinlm.errors import UserError
from spinlm.hub import hub_problem
from spinlm.modeling import check_vocab_fits, load_model, load_tokenizer, tokenizer_source


def test_tokenizer_precedence_checkpoint_then_tokenizer_path_then_model_path(tiny_task, tmp_path):
    model = OmegaConf.create({"path": str(tiny_task / "sft_model"), "tokenizer_path": None})
    assert tokenizer_source(model) == str(tiny_task / "sft_model")
    model.tokenizer_path = str(tiny_task / "tokenizer")
    assert tokenizer_source(model) == str(tiny_task / "tokenizer")
    checkpoint = tmp_path / "checkpoints" / "1"
    checkpoint.mkdir(parents=True)
    assert tokenizer_source(model, checkpoint) == str(tiny_task / "tokenizer")  # a checkpoint without a tokenizer
    shutil.copy(tiny_task / "sft_model" / "tokenizer_config.json", checkpoint)
    assert tokenizer_source(model, checkpoint) == str(checkpoint)


def test_an_unreachable_hub_is_named_in_seconds_not_after_retries(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    problem = hub_problem("model.path", "someone/not-downloaded-model")
    assert problem.startswith("model.path=someone/not-downloaded-model: not a local folder and not in the Hugging "
                              "Face cache, and the hub (127.0.0.1) cannot be reached (")
    assert problem.endswith("set model.path=DIR")
    assert hub_problem("model.path", str(tmp_path)) is None  # a local folder is never probed
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE is set" in hub_problem("model.path", "someone/not-downloaded-model")


def test_truncated_weights_and_missing_tokenizer_are_user_errors(tiny_task, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_task / "sft_model", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    with pytest.raises(UserError, match=rf"{broken}: cannot load the model weights \(SafetensorError: .*use an "
                                        "earlier checkpoint"):
        load_model(str(broken), dtype="float32", attn_implementation="sdpa", device="cpu")
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    with pytest.raises(UserError, match=rf"{no_tokenizer}: cannot load a tokenizer from it"):
        load_tokenizer(str(no_tokenizer))


def test_a_tokenizer_larger_than_the_embedding_is_refused(tiny_task):
    model = load_model(str(tiny_task / "sft_model"), dtype="float32", attn_implementation="sdpa", device="cpu")
    tokenizer = load_tokenizer(str(tiny_task / "sft_model"))
    check_vocab_fits(tokenizer, model, "model.path=x")  # the task's own pair fits
    rows = model.get_input_embeddings().num_embeddings
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(rows - len(tokenizer) + 1)])
    with pytest.raises(UserError, match=rf"model.path=x: the tokenizer has {rows + 1} tokens but the model's "
                                        rf"embedding has {rows} rows"):
        check_vocab_fits(tokenizer, model, "model.path=x")
