"""The kernels' host-side facts that need no Triton: the names of the strategies the launchers
take, and the environment read of the per-call paths.

lora_fused reads these (through ``lora_fused.dispatch.backend``, its one importer of kernel
modules) on machines where triton is absent or not yet imported: this module imports only the
standard library, while every kernel family imports triton.

The environment read is a private CPython route with a public fallback:
``os.environ.get`` encodes the name and decodes the value (about 1.5 µs a read); on POSIX,
``os.environ._data`` is the dict that ``os.environ`` keeps in sync on every set and unset
(``monkeypatch.setenv`` included), keyed by the encoded name, and a lookup there is a dict
lookup. It is taken only where it is a dict that agrees with ``os.environ``; elsewhere the
same functions read ``os.environ`` itself. ``tests/test_compat.py`` runs both.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

#: Forward strategies of ``kernels/lora_linear.py`` (docs/design.md, "Strategies and the measured choice").
FORWARD_STRATEGIES = ("fused", "shrink_first", "composite")
#: Backward strategies of ``kernels/lora_linear.py`` (the dX pass; dS, dB, dA are the same in both).
BACKWARD_STRATEGIES = ("fused", "composite")
#: Regimes of ``kernels/multi_lora.py`` (its MULTI_CONFIGS keys): the multi-adapter op's strategies.
MULTI_LORA_STRATEGIES = ("prefill", "prefill_cublas", "decode")
#: Strategies of ``kernels/moe_lora.py`` (grouped expert LoRA): the base by torch's vendor grouped
#: GEMM plus Triton epilogues, or a Triton grouped GEMM with the LoRA term in its epilogue.
GROUPED_STRATEGIES = ("grouped_mm", "fused")


def _private_environ_data(environ=os.environ) -> Optional[dict]:
    """``environ._data`` where it is the dict behind ``environ`` (POSIX CPython), else None."""
    data = getattr(environ, "_data", None)
    encodekey, encodevalue = getattr(environ, "encodekey", None), getattr(environ, "encodevalue", None)
    if os.name != "posix" or not isinstance(data, dict) or encodekey is None or encodevalue is None:
        return None
    for name in list(environ)[:3]:  # a few entries: the same variables, the same values
        if data.get(encodekey(name)) != encodevalue(environ[name]):
            return None
    return data


_ENVIRON_DATA = _private_environ_data()


def env_lookup(*names: str) -> tuple[Callable[[object], object], tuple]:
    """``(get, keys)``: ``get(key)`` for ``key`` in ``keys`` (one per name) is that variable's
    current raw value, None when unset: bytes on the private route, str on the public one.
    Compare raw values only with each other or with :func:`env_raw`'s; decode with
    ``os.environ.get`` where the text matters."""
    if _ENVIRON_DATA is not None:
        return _ENVIRON_DATA.get, tuple(os.environ.encodekey(name) for name in names)
    return os.environ.get, names


def env_raw(value: str) -> object:
    """``value`` as :func:`env_lookup`'s ``get`` returns it for a variable set to ``value``."""
    return os.environ.encodevalue(value) if _ENVIRON_DATA is not None else value
