"""lora-fused benchmarks: a sweep CLI, pytest-benchmark tests and the GPU device script.

    python -m bench [--quick] [--cases SPEC] [--providers LIST] [--dtype bf16] [--out DIR]
    pytest bench/ --benchmark-only          # the same cases under pytest-benchmark
    bash bench/device_check.sh              # the one call for a lent GPU

Modules:
  cases.py      the case registry (shapes, modes, groups, goal tags) and its selection syntax
  goals.py      goals P1..P7c, Q1..Q3, D1..D4, S1..S3, H1..H7 and their evaluation over measured rows
  providers.py  the implementations compared (fused, eager, peft, compiled, merged, base;
                peft-mixed and loop for multi-adapter cases) over the same random inputs
  qlora.py      the QLoRA cases' inputs (a bitsandbytes NF4 W0) and providers (fused =
                lf.LoRALinear4bit, eager-qlora, peft-qlora; goals Q1-Q3)
  dora.py       the DoRA cases' inputs and providers (fused = lf.DoRALinear, fused-lora,
                peft-dora; goals D1-D4); also ``python -m bench.dora``, the stand-alone step timer
  serving.py    the serving cases' inputs and providers (the delta alone: packed lf.add_lora,
                three-calls, vllm, sglang, base GEMM; goals S1-S3); also ``python -m bench.serving``
  measure.py    timing (do_bench / CUDA graphs / CPU timer), peak memory, saved-activation
                bytes, FLOP/byte counts, measured GPU ceilings
  runner.py     one case x provider: inputs, correctness check, memory, timing -> a row
  host.py       the host group (--cases host): us per call at tiny shapes, interleaved rounds,
                Triton launches no-op'd to time the host work around them (goals H1-H7)
  report.py     tables (text, markdown), JSON, PNG plots
  __main__.py   the sweep CLI (python -m bench)

Nothing here is imported by the library; ``import bench`` imports nothing heavy.
"""
