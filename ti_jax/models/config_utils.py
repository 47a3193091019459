"""Validation helpers for diffusers/transformers `config.json` files."""

from __future__ import annotations

from typing import Any, Mapping


class UnsupportedConfigError(ValueError):
  """A model config asks for an architecture ti_jax does not implement."""


def check_supported(component: str, cfg: Mapping[str, Any],
                    required: Mapping[str, tuple[Any, ...]]) -> None:
  """Raises `UnsupportedConfigError` naming the first field whose value ti_jax cannot honour.

  Fields absent from `cfg` take diffusers' defaults, which are always supported.
  """
  for field, allowed in required.items():
    if field in cfg and cfg[field] not in allowed:
      raise UnsupportedConfigError(
          f"{component} config: {field}={cfg[field]!r} is not supported by ti_jax "
          f"(supported: {', '.join(repr(a) for a in allowed)})")
