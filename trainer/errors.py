"""The trainer's argument error, in a module of its own so that every checker (config,
recipe, augment, mixing) can raise it without importing the config that calls them."""
from __future__ import annotations

from dynavit.manifests.options import ArgumentError


class ConfigError(ArgumentError):
    """A bad argument, detected before anything is written. `param` names the option."""
