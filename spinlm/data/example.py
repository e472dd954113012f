"""The one record type every data format is read into."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class DataError(ValueError):
    """A bad data file or row. The message names the file, the row index and the field."""


@dataclass
class Example:
    prompt: list[dict[str, str]]          # chat messages before the response: [{"role": ..., "content": ...}, ...]
    response: str | None = None           # the ground-truth (chosen) response, if the data has one
    rejected: str | None = None           # a given rejected response (SPIN `generated`, TRL `rejected`)
    data_source: str = ""                 # selects the reward function (verl convention)
    ground_truth: str | None = None       # what the reward function compares against
    extra_info: dict[str, Any] = field(default_factory=dict)
    origin: str = ""                      # "<file>:<row>", for error messages
