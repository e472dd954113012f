"""`spinlm prepare model --gguf FILE --output DIR`: a GGUF file (llama.cpp's format, e.g. a quantised Q4 model)
into a plain Hugging Face model folder that spinlm trains.

transformers reads GGUF itself (it dequantises every tensor to the requested dtype) but refuses to save the model it
loaded ("quantized with gguf and is not serializable"). So: load with `gguf_file`, rebuild the same architecture
from the loaded config minus its `quantization_config`, copy the state dict in (all keys must match), and save that
with the tokenizer (vocabulary, special tokens and chat template from the GGUF metadata).
"""
from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

from spinlm.errors import UserError
from spinlm.extras import install_hint

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


def check_gguf_file(path: Path) -> None:
    """Clear errors for a missing package, a missing file or a file that is not GGUF, before any loading."""
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"reading a GGUF file needs the gguf package: {install_hint('gguf')} (or pip install gguf)")
    if not path.is_file():
        raise UserError(f"--gguf {path}: no such file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"--gguf {path}: not a GGUF file (it starts with {magic!r}, a GGUF file with {GGUF_MAGIC!r})")


def gguf_to_hf(gguf_file: str | Path, output_dir: str | Path) -> Path:
    """Write the GGUF model (dequantised to float32) and its tokenizer to output_dir; returns output_dir."""
    gguf_file, out = Path(gguf_file), Path(output_dir)
    check_gguf_file(gguf_file)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--output {out}: already exists and is not an empty folder; pick a new folder")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ValueError as exc:  # transformers' own words, e.g. an architecture it cannot read from GGUF
        raise UserError(f"--gguf {gguf_file}: transformers could not load it: {exc}") from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the marker that makes save_pretrained refuse; the weights are dequantised
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a conversion cut short earlier
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        out.rmdir()  # empty, checked above
    tmp.replace(out)
    logger.info("converted %s into %s (%s parameters)", gguf_file, out, sum(p.numel() for p in model.parameters()))
    return out
