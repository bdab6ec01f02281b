"""Helpers for result rows (one dict per case x provider), shared by bench/runner.py and
bench/host.py: what an error row says, and the ratios every row carries."""
from __future__ import annotations


def error_reason(exc: BaseException) -> str:
    """An exception as one line of a row's ``reason`` (at most 300 characters)."""
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]


def add_ratios(rows: list[dict]) -> None:
    """vs_base, vs_eager, vs_fused: median time (saved mode: saved bytes) over that provider's."""
    key = "saved_bytes" if rows and rows[0]["mode"] == "saved" else "median_ms"
    ref = {r["provider"]: r.get(key) for r in rows if r.get("status") == "ok" and r.get(key)}
    for r in rows:
        v = r.get(key) if r.get("status") == "ok" else None
        for name in ("base", "eager", "fused"):
            r[f"vs_{name}"] = (v / ref[name]) if (v is not None and ref.get(name)) else None
