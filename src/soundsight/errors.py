"""The errors soundsight raises for bad input: one base class, one subclass per kind.

The CLI catches :class:`SoundsightError` (and ``OSError`` for files) and prints its
one-line message; anything else is a bug and keeps its traceback. Each subclass also
derives from ``ValueError`` so that ``except ValueError`` in users' code keeps working.
"""

from __future__ import annotations


class SoundsightError(Exception):
    """Bad input that soundsight can name: a file, a field, a value, and the problem."""


class ConfigError(SoundsightError, ValueError):
    """A configuration value (feature, model, training or serving setting) out of range."""
