"""`spinlm prepare model --gguf`: a real GGUF file, written with the gguf package from spinlm's tiny Llama the way
llama.cpp's converter lays it out, converted back into a Hugging Face folder; and the error paths."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from spinlm.cli import main
from spinlm.errors import UserError
from spinlm.prepare_model import gguf_to_hf

gguf = pytest.importorskip("gguf")


def write_gguf(model, tok, path: Path) -> Path:
    """Float32 GGUF of a Llama: llama.cpp's metadata keys and tensor names, q/k rows permuted for its rotary layout
    (transformers undoes that permutation on load), a byte-level BPE ("gpt2") tokenizer with its chat template."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in tok.all_special_ids else 1 for i in range(len(tokens))])  # 3: control
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges([" ".join(m) for m in json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]])
    w.add_bos_token_id(tok.eos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight":  # tied: GGUF leaves output.weight out
            continue
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        a = tensor.float().numpy()
        if ".attn_q." in name or ".attn_k." in name:
            n = c.num_attention_heads if ".attn_q." in name else c.num_key_value_heads
            a = a.reshape(n, 2, a.shape[0] // n // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        w.add_tensor(name, a.copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from spinlm.tasks.tiny_model import build_model, train_tokenizer

    tok = train_tokenizer([f"{a}+{b}={a + b}" for a in range(30) for b in range(30)], vocab_size=64)
    model = build_model(tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0).eval()
    return model, tok, write_gguf(model, tok, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_gguf_converts_to_a_model_folder_with_identical_logits(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok, path = tiny
    out = tmp_path / "model"
    assert main(["prepare", "model", "--gguf", str(path), "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"spinlm prepare model: wrote {out}"
    assert not (out / "config.json").read_text().count("quantization_config")
    converted = AutoModelForCausalLM.from_pretrained(out).eval()  # a plain folder: no gguf_file needed
    ids = torch.tensor([tok("12+7=19")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, model(ids).logits)
    assert converted.config.tie_word_embeddings
    t2 = AutoTokenizer.from_pretrained(out)
    assert (t2.eos_token, t2.pad_token, t2.chat_template) == (tok.eos_token, tok.pad_token, tok.chat_template)
    assert all(t2.get_vocab()[t] == i for t, i in tok.get_vocab().items())
    assert t2("3+4=7")["input_ids"] == tok("3+4=7")["input_ids"]


def test_gguf_error_paths(tiny, tmp_path, monkeypatch, capsys):
    _, _, path = tiny
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(UserError, match=r"not a GGUF file \(it starts with b'PK\\x03\\x04', a GGUF file with b'GGUF'\)"):
        gguf_to_hf(not_gguf, tmp_path / "a")
    with pytest.raises(UserError, match=r"--gguf .*missing\.gguf: no such file"):
        gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "b")
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"--output .*full: already exists and is not an empty folder"):
        gguf_to_hf(path, full)
    assert main(["prepare", "model", "--output", str(tmp_path / "c")]) == 2
    assert "spinlm prepare model needs --gguf FILE" in capsys.readouterr().err
    assert main(["prepare", "gsm8k", "--output", str(tmp_path / "d.parquet")]) == 2
    assert "spinlm prepare gsm8k needs --input FILE" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "gguf", None)  # Python's own way to make an import fail
    with pytest.raises(UserError, match=r'needs the gguf package: pip install -e ".*\[gguf\]"'):
        gguf_to_hf(path, tmp_path / "e")
    assert not any((tmp_path / n).exists() for n in "abcde")  # nothing written
