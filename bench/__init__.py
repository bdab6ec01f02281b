"""lora-fused benchmarks: a sweep CLI, pytest-benchmark tests and the GPU device script.

    python -m bench [--quick] [--cases SPEC] [--providers LIST] [--dtype bf16] [--out DIR]
    pytest bench/ --benchmark-only          # the same cases under pytest-benchmark
    bash bench/device_check.sh              # the one call for a lent GPU

Modules, each importing only those listed below it (tests/test_bench_imports.py checks that
bench/ has no import cycle):
  __main__.py   the sweep CLI (python -m bench)
  host_child.py the child process that times the Triton host cases of a CPU run
  dora.py       ``python -m bench.dora``: the stand-alone DoRA training-step timer
  serving.py    ``python -m bench.serving``: the stand-alone serving-delta timer
  tune.py       ``python -m bench --tune``: fills the strategy cache for a model's shapes
  runner.py     one case x provider: inputs, correctness check, memory, timing -> a row
  host.py       the host group (--cases host): us per call at tiny shapes, interleaved rounds,
                Triton launches no-op'd to time the host work around them (goals H1-H7)
  providers/    the implementations compared, one module per family of cases over one base
                module: linear (fused, its forced strategies, eager, peft, compiled, merged, base),
                multi (fused, fused-cublas, loop, peft-mixed), qlora, dora, serving, moe (one
                MoE experts block: fused, eager-loop, peft-moe, base)
  report.py     tables (text, markdown), JSON, PNG plots
  goals.py      goals P1..P7c, F1, Q1..Q3, D1..D4, S1..S3, M-*, H1..H7, their evaluation over measured
                rows, and the README's goals table (python -m bench.goals --markdown)
  rows.py       result-row helpers (error reasons, ratios)
  measure.py    timing (do_bench / CUDA graphs / CPU timer), peak memory, saved-activation
                bytes, bytes allocated in a call (a TorchDispatchMode), measured GPU ceilings
  cases.py      the case registry (shapes, modes, groups, goal tags, FLOP/byte counts) and its
                selection syntax

Nothing here is imported by the library; ``import bench`` imports nothing heavy.
"""
