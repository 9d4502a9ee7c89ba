"""Methods: the interface (``api``), the registry, and one folder or module per method."""

from .api import CacheSpec, Method, NotApplicableError, Optimization, OptionsError, TrainingData
from .registry import (
    check_method_options,
    create_method,
    get_method,
    list_methods,
    load_method,
    register_method,
    save_method,
)

__all__ = ["CacheSpec", "Method", "NotApplicableError", "Optimization", "OptionsError", "TrainingData",
           "check_method_options", "create_method", "get_method", "list_methods", "load_method", "register_method",
           "save_method"]
