"""Helpers shared by the per-stage config dataclasses (features, training, ...).

Each stage owns its own frozen dataclass; these functions give them one JSON form so
that a cache or a model file carries the exact config that produced it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain-JSON dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild ``cls`` from :func:`config_to_dict` output, rejecting unknown keys."""
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    values = {
        key: tuple(value) if isinstance(value, list) else value for key, value in data.items()
    }
    return cls(**values)


def config_digest(config: Any, length: int = 12) -> str:
    """Stable short hash of a config's values: equal configs share a digest."""
    text = json.dumps(config_to_dict(config), sort_keys=True)
    return hashlib.sha1(f"{type(config).__name__}:{text}".encode()).hexdigest()[:length]
