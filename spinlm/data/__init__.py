"""Data: reading the accepted formats into Examples, and tokenising them with the model's chat template."""
from spinlm.data.example import DataError, Example

__all__ = ["DataError", "Example"]
