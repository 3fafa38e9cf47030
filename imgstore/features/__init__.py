"""Feature extractors behind one small protocol, and their registry.

Importing this package does not import torch: the CNN extractors are imported inside their
factories, so ``imgstore --help`` and pure-numpy users stay fast.

>>> ex = get_extractor("efficientnet-lite0", precision="fp32")   # doctest: +SKIP
>>> ex.extract([img]).shape                                      # doctest: +SKIP
(1, 1280)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from .base import Extractor

__all__ = ["DEFAULT_EXTRACTOR", "Extractor", "available_extractors", "get_extractor"]

DEFAULT_EXTRACTOR = "efficientnet-lite0"


def _efficientnet_lite0(**options: Any) -> Extractor:
    from .efficientnet import EfficientNetLite0Extractor

    return EfficientNetLite0Extractor(**options)


def _efficientnet_lite2(**options: Any) -> Extractor:
    from .efficientnet import EfficientNetLite2Extractor

    return EfficientNetLite2Extractor(**options)


def _resnet50(**options: Any) -> Extractor:
    from .resnet import ResNet50Extractor

    return ResNet50Extractor(**options)


def _color(**options: Any) -> Extractor:
    from .color import ColorExtractor

    if options:
        raise ConfigError(f"the color extractor takes no options, got {', '.join(sorted(options))}")
    return ColorExtractor()


_FACTORIES: dict[str, Callable[..., Extractor]] = {
    "efficientnet-lite0": _efficientnet_lite0,
    "efficientnet-lite2": _efficientnet_lite2,
    "resnet50": _resnet50,
    "color": _color,
}


def available_extractors() -> list[str]:
    """Names accepted by :func:`get_extractor`, the default first."""
    return [DEFAULT_EXTRACTOR, *sorted(n for n in _FACTORIES if n != DEFAULT_EXTRACTOR)]


def get_extractor(name: str = DEFAULT_EXTRACTOR, **options: Any) -> Extractor:
    """Build an extractor by name. Loads its weights now (can take a second); options are per extractor.

    Raises ConfigError for an unknown name or option, WeightsNotFoundError when weights are needed
    and missing.
    """
    factory = _FACTORIES[_check(name)]
    try:
        return factory(**options)
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc):
            raise ConfigError(f"bad option for extractor {name!r}: {exc}") from None
        raise


def _check(name: str) -> str:
    if name not in _FACTORIES:
        raise ConfigError(f"unknown extractor {name!r}; available: {', '.join(available_extractors())}")
    return name
