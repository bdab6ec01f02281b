"""The child process of a CPU run's Triton host cases (bench/host.py, :class:`HostChild`).

    python -m bench.host_child --cases NAMES [--rounds N] [--providers LIST]

prints one JSON line: the rows of the named host cases, measured in this process, which
its parent starts with ``TRITON_INTERPRET=1`` set before the kernels are defined. It sits
above both bench/runner.py and bench/host.py (the runner hands host cases to host.py, so
host.py cannot build a runner itself).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from .cases import host_cases
from .host import run_host_case
from .runner import Runner, Settings


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.host_child")
    ap.add_argument("--cases", required=True, help="host case names, comma-separated")
    ap.add_argument("--rounds", type=int, default=101)
    ap.add_argument("--providers", default="eager,fused,peft,peft-mixed")
    args = ap.parse_args(argv)
    runner = Runner(Settings(device=torch.device("cpu"), host_rounds=args.rounds))
    by_name = {c.name: c for c in host_cases()}
    rows = []
    for name in args.cases.split(","):
        rows += run_host_case(runner, by_name[name], args.providers.split(","))
    print(json.dumps(rows, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
