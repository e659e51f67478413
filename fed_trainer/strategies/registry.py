"""Name -> strategy class registry."""

from __future__ import annotations

import difflib
import inspect
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


def strategy_classes() -> dict[str, type[Strategy]]:
    """Every registered strategy class by name."""
    return dict(_REGISTRY)


def strategy_class(name: str) -> type[Strategy]:
    """The class registered as `name`."""
    if name not in _REGISTRY:
        raise ValueError(unknown_strategy_message(name))
    return _REGISTRY[name]


def available_strategies() -> list[str]:
    """Names accepted by `FederatedConfig.strategy`."""
    return sorted(_REGISTRY)


def unknown_strategy_message(name: str) -> str:
    """The error for an unregistered name: the closest registered one, and all of them."""
    close = difflib.get_close_matches(name.lower().replace("-", "_"), available_strategies(), n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (
        f"Unknown strategy {name!r}.{hint} Registered strategies: {available_strategies()}; register your own with "
        "fed_trainer.register_strategy."
    )


def strategy_options(name: str) -> dict:
    """The options of the strategy registered as `name` (its constructor's keyword arguments) and their defaults."""
    parameters = list(inspect.signature(_REGISTRY[name].__init__).parameters.values())[1:]
    return {p.name: p.default for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def get_strategy(name: str, **options) -> Strategy:
    """A new instance of the strategy registered as `name`, built with its `options` (`strategy_kwargs`)."""
    cls = strategy_class(name)
    known = strategy_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        takes = f"takes {sorted(known)}" if known else "takes no options"
        raise ValueError(f"strategy_kwargs {unknown} are not options of strategy {name!r}, which {takes}.")
    return cls(**options)
