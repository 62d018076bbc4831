"""ddpm.bench: ``ddpm bench`` — per-stage latency (forward, update, loop) of engines against eager PyTorch, with
floors, spread and the machine's load; every runtime x precision side by side (bench/run.py).

    config.py   BenchConfig: what to measure, checked before minutes of measuring
    run.py      run_bench: open every runtime x precision, measure every batch size, assemble the report
    stages.py   the three measured stages; baseline.py: the eager-PyTorch baselines they are timed against
    timing.py   timing with the CPU share each row got; floors.py: bandwidth / matmul floors
    trust.py    the targets and the verdict, withheld when the machine was too busy to trust
    report.py   markdown table and plot
    cli.py      the ``ddpm bench`` command (typer only at import)

It knows the core and the runtime it measures (backends, sampling plans), nothing else.
"""
