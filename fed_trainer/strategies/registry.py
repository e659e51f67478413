"""Name -> strategy class registry."""

from __future__ import annotations

from collections.abc import Callable

from fed_trainer.strategies.base import Strategy

_REGISTRY: dict[str, type[Strategy]] = {}


def register_strategy(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator that makes a `Strategy` subclass available as `FederatedConfig(strategy=name)`."""

    def decorator(cls: type[Strategy]) -> type[Strategy]:
        if not issubclass(cls, Strategy):
            raise TypeError(f"{cls.__name__} must subclass fed_trainer.Strategy to be registered.")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"A strategy named {name!r} is already registered ({_REGISTRY[name].__name__}).")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_strategies() -> list[str]:
    """Names accepted by `FederatedConfig.strategy`."""
    return sorted(_REGISTRY)


def get_strategy(name: str) -> Strategy:
    """A new instance of the strategy registered as `name`."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown strategy {name!r}; choose one of {available_strategies()}.")
    return _REGISTRY[name]()
