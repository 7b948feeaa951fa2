"""Benchmarks: the performance report (benchmark), the memory soak (soak), the transport baseline and the model
floor (echo), and the workers, floors and peer-rig sections (scaling).

    python -m clients.bench.benchmark [--quick] --out docs/performance.md [--json FILE]
    python -m clients.bench.soak --duration 300 --out docs/soak.md
    python -m clients.bench.echo --port-file FILE [--run-model FOLDER]   (also: charrnn-loadgen --serve-echo)
    python -m clients.bench.scaling workers|floors|peers

Modules: plan (what a run measures; the cell and report records), environment (the machine, the models
measured), inprocess (onnxruntime and our handler without gRPC), servers (server processes, their memory and
metrics), cells (load cells driven by charrnn-loadgen), targets (ratios and ceilings), report (the markdown),
benchmark (the command), soak, echo. Importing this package imports none of them: the load generator imports
echo's protocol without the benchmark's dependencies (psutil, the server).
"""
