"""Single-process mixed precision (fp32 master weights, bf16 autocast forwards), gradient checkpointing and the
attention choice, on a real tiny Llama saved to disk and loaded by the PolicyWorker, on CPU."""
from __future__ import annotations

import pytest
import torch

from spinlm.config import load_config
from conftest import save_arith_model
from spinlm.pairs import Pairs
from spinlm.workers.dp_actor import LossSettings
from spinlm.workers.fsdp_workers import PolicyWorker
from spinlm.workers.logprobs import PACKED_SDPA
from spinlm.modeling import resolve_attn_implementation

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_arith_model(tmp_path_factory.mktemp("tiny_model"), hidden_size=32, intermediate_size=64)


def worker(model_dir, *overrides: str) -> PolicyWorker:
    cfg = load_config([f"model.path={model_dir}", "trainer.device=cpu", "actor.lr=1e-5", "actor.warmup_ratio=0",
                       "actor.lr_scheduler=constant", "actor.micro_batch_size=4", *overrides])
    torch.manual_seed(0)
    w = PolicyWorker(cfg, str(model_dir), keep_opponent=False)
    w.start_schedule(10)
    return w


def pairs() -> Pairs:
    gen = torch.Generator().manual_seed(0)
    tok = lambda n: torch.randint(5, 64, (n,), generator=gen).tolist()  # noqa: E731  (0-4: special tokens)
    return Pairs([tok(6) for _ in range(6)], [tok(5) for _ in range(6)], [tok(7) for _ in range(6)])


def test_bf16_trains_fp32_master_weights_with_bf16_compute(model_dir):
    fp32, bf16 = worker(model_dir), worker(model_dir, "model.dtype=bfloat16")
    p = pairs()
    assert all(t.dtype == torch.float32 for t in bf16.policy.parameters())
    ref32 = fp32.sequence_logps(p.prompts, p.chosen)
    ref16 = bf16.sequence_logps(p.prompts, p.chosen)
    assert not torch.equal(ref16, ref32)  # the forward really ran in bf16 ...
    torch.testing.assert_close(ref16, ref32, rtol=2e-2, atol=0.1)  # ... and stays close to fp32

    before = [t.detach().clone() for t in bf16.policy.parameters()]
    loss = LossSettings(beta=0.1)
    m32 = fp32.update(p, loss, len(p), ref=(ref32, fp32.sequence_logps(p.prompts, p.rejected)))
    m16 = bf16.update(p, loss, len(p), ref=(ref16, bf16.sequence_logps(p.prompts, p.rejected)))
    assert m16["loss"] == pytest.approx(m32["loss"], abs=1e-3)  # log(2) at the start, in both
    assert m16["train/grad_norm"] == pytest.approx(m32["train/grad_norm"], rel=0.05)
    assert all(t.dtype == torch.float32 for t in bf16.policy.parameters())
    assert all(s.dtype == torch.float32 for st in bf16.optimizer.state.values() for s in st.values()
               if torch.is_tensor(s) and s.is_floating_point())
    # Adam moves each weight by about lr = 1e-5: far below bf16's resolution (2^-8 relative), so pure bf16 weights
    # would round nearly every update away; fp32 masters keep them all.
    moved = torch.cat([(a - b).ne(0).flatten() for a, b in zip(bf16.policy.parameters(), before)]).float().mean()
    assert moved > 0.9


def test_gradient_checkpointing_recomputes_layers_and_gives_the_same_update(model_dir):
    plain, ckpt = worker(model_dir), worker(model_dir, "model.gradient_checkpointing=true")
    calls = {"plain": 0, "ckpt": 0}
    for name, w in (("plain", plain), ("ckpt", ckpt)):
        w.model.model.layers[0].mlp.register_forward_pre_hook(  # inside the checkpointed layer forward
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    p = pairs()
    ref_c, ref_r = plain.sequence_logps(p.prompts, p.chosen), plain.sequence_logps(p.prompts, p.rejected)
    calls.update(plain=0, ckpt=0)
    m_plain = plain.update(p, LossSettings(beta=0.1), len(p), ref=(ref_c, ref_r))
    m_ckpt = ckpt.update(p, LossSettings(beta=0.1), len(p), ref=(ref_c, ref_r))
    assert calls["ckpt"] == 2 * calls["plain"] > 0  # each micro-batch's layer forward runs again in backward
    assert m_ckpt["train/grad_norm"] == pytest.approx(m_plain["train/grad_norm"], rel=1e-5)
    for a, b in zip(ckpt.policy.parameters(), plain.policy.parameters()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)


def test_auto_attention_is_sdpa_without_flash_attn(model_dir):
    assert resolve_attn_implementation("auto", torch.device("cpu")) == "sdpa"
    assert resolve_attn_implementation("eager", torch.device("cpu")) == "eager"
    w = worker(model_dir, "model.attn_implementation=auto")
    # sdpa, with one causal call per packed sequence in the log-prob passes (generation: plain sdpa)
    assert w.model.config._attn_implementation == PACKED_SDPA
    assert w.actor.block_mask  # still passed: without it transformers would build it from the packed position_ids
