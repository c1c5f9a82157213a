"""Counting XLA compilations through JAX's public monitoring events (one
`backend_compile_duration` event per program compiled; a cache hit records none)."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

import jax

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def counting_compiles() -> Iterator[list[int]]:
    """`with counting_compiles() as n:` ... `n[0]` programs compiled inside the block."""
    count = [0]

    def listener(event: str, duration: float, **_: object) -> None:
        if event == BACKEND_COMPILE:
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@contextlib.contextmanager
def compiles_by_function() -> Iterator[collections.Counter[str]]:
    """`with compiles_by_function() as n:` ... `n[name]` programs compiled inside the block
    for the jitted function `name` (the event's `fun_name`)."""
    count: collections.Counter[str] = collections.Counter()

    def listener(event: str, duration: float, **kwargs: object) -> None:
        if event == BACKEND_COMPILE:
            count[str(kwargs.get("fun_name"))] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
