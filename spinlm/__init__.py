"""spinlm: Self-Play Fine-Tuning (SPIN) and online DPO for Hugging Face causal language models."""
__version__ = "0.1.0"


def train(config=None):
    """``spinlm train`` as a function: ``spinlm.train(["preset=tiny", "trainer.rounds=2"])`` returns a RunResult
    (``.rounds``, ``.run_dir``, ``.report``). See spinlm.api.train; torch is imported only when this is called."""
    from spinlm.api import train as _train

    return _train(config)
