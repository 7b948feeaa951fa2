"""charrnn-batch: encode a word list far larger than memory, over one or more servers, results in input order.

    charrnn-batch --target HOST:PORT [--target ...] --model NAME --input FILE|- --output FILE|- [--resume]

The input (a file, or `-` for stdin) is read as a stream: `text` (one word per line), `jsonl` (one object per
line, the word in --field) or `csv` (a header row, the word in --column). It is cut into chunks of --chunk-size
words, and each chunk is one message on an EncodeStream RPC. Several streams run at once (--streams per target,
every target its own channel; a target resolving to several addresses is spread by gRPC's round_robin policy),
all pulling chunks from one shared queue, so a faster server simply takes more. At most --max-in-flight chunks
exist at any time between being read and being written, which bounds memory whatever the input size.

The output is JSONL, one line per input record, in input order:

    {"index":0,"word":"hello","outputs":[[...],...],"hidden":[[...],...],"cell":[[...],...]}   (cell: LSTM only)
    {"index":1,"word":"hex","error":"character 'x' at position 2 is not in the model's alphabet 'helo'"}

A chunk is written, and the file flushed, only when every chunk before it has been; a kill therefore leaves
complete lines plus at most one partial line, and --resume truncates that line, skips as many input records as
the output has lines, and appends.

A broken stream, a server restarting, draining or killed, or a full queue (decided from the status details the
server sends, clients.errors) is retried with exponential backoff; only the chunks not yet answered are sent
again, to whichever stream takes them first. A chunk unanswered after --retry-seconds of failures ends the job.

Exit status: 0 every word encoded; 3 some words could not be encoded (their lines hold "error"); 1 a fatal
error (bad arguments to the server, unreadable input, servers down for longer than --retry-seconds); 2 a
usage error; 130/143 interrupted by SIGINT/SIGTERM (the output is valid for --resume).

Modules: records (input -> records -> chunks, on a reader thread), job (the shared queue, the in-order writer,
the lanes that stream chunks), failures (fatal or retried, backoff), output (JSONL lines, --resume scan),
progress (stderr), targets (channels and streams), cli (arguments, wiring, exit status).
"""

from clients.batch.cli import main

__all__ = ["main"]
