"""charrnn-loadgen: a closed-loop load generator for the charrnn.v1 service (think Triton's perf_analyzer).

N workers each keep exactly one request outstanding (concurrency N), every request carrying W words of
L letters drawn from the model's alphabet. The run is bounded by time (--duration) or by a request count
(--requests); it prints throughput (requests/s, words/s) and latency percentiles as text or JSON.

To keep the client from being what is measured:
- requests are serialised once, up front, and responses are not parsed (raw bytes on the wire; only the
  first response of each worker is decoded and checked);
- --processes P spreads the workers over P processes, each with its own event loop and channel; their
  measurement windows are aligned by a barrier and their results merged.

--stream drives EncodeStream instead (one stream per worker, one message in flight on each).
--echo drives the trivial echo service of clients.bench.echo (also started by `--serve-echo`; a grpc.aio generic
handler returning a fixed payload): the transport baseline, with requests of the same size as real ones and
responses of --echo-response-bytes.

Modules: config (LoadConfig, LoadResult, merging), pool (the serialised requests), workers (one process's
workers and clock), fanout (run_load over one or several processes), cli (the command).
"""

from clients.loadgen.cli import main
from clients.loadgen.config import LoadConfig, LoadResult
from clients.loadgen.fanout import run_load

__all__ = ["LoadConfig", "LoadResult", "main", "run_load"]
