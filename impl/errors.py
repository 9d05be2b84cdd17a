"""Error types shared across the system package."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""
