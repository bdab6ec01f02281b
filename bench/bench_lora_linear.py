#!/usr/bin/env python
"""Single-layer benchmark against the project's goals (kept as an entry point).

    python bench/bench_lora_linear.py [--quick] [--dtype bf16] [--rank 16] [--out DIR]
                                      [--peft auto|on|off] [--cpu] [--strict]

is ``python -m bench --cases headline`` with the same options (any other option of
``python -m bench`` works too, e.g. ``--cases sweep``). The implementation lives in
the ``bench`` package: see bench/__init__.py and ``python -m bench --help``.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--cases", "headline"] + sys.argv[1:]))
