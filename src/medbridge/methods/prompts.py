"""Label prompts: the one template and the one readable-name function every text-prompted method uses.

``prompt_name`` is the rule dataset runs have always used (``Effusion`` -> ``pleural effusion``, the names behind the
published numbers); ``create_method(labels=...)`` uses the same rule, so a label prompts the same text whether the
method was built from a dataset or from a list of names."""

from __future__ import annotations

from ..data.labels import PROMPT_NAMES, prompt_name

#: the prompt template, ``{}`` = a label's readable name
DEFAULT_TEMPLATE = "a radiology image with {}."

__all__ = ["DEFAULT_TEMPLATE", "PROMPT_NAMES", "prompt_name"]
