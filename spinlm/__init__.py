"""spinlm: Self-Play Fine-Tuning (SPIN) and online DPO for Hugging Face causal language models."""
__version__ = "0.1.0"
