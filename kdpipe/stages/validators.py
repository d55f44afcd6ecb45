"""pydantic field validators stage configs share."""

from __future__ import annotations

from kdpipe.errors import ConfigError
from kdpipe.models.factory import check_model_name


def known_model(cls: type, value: str) -> str:
    """Field validator: ``value`` is a model name timm can build (with a did-you-mean otherwise)."""
    try:
        check_model_name(value, "model")
    except ConfigError as exc:
        raise ValueError(exc.message.removeprefix("model: ")) from None
    return value
