"""What a cluster night adds per experiment, beside the run itself: the figures of docs/cluster.md's model.

    uv run --extra ray python bench/cluster_overhead.py [--address HOST:PORT] [--mib 200] [--repeat 5]

1. dispatch: a task pinned to a node, in a fresh worker process (as runner.night.cluster runs each experiment),
   that yields one event: seconds from submit to the first event, and to its end;
2. transfer: a run directory of --mib MiB coming back in runner.night.cluster_node's pieces: MiB/s;
3. ledger: one lifecycle write (an experiment takes about ten): milliseconds.
Without --address a one-node Ray is started here (the transfer then goes through local shared memory:
a lower bound of the time a network adds).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import ray  # noqa: E402
import structlog  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from runner.core.ledger import Ledger  # noqa: E402
from runner.night.cluster_node import MAX_CHUNK  # noqa: E402
from sandbox.status import Status  # noqa: E402

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def one_event():
    yield ("started", os.getpid())


def pieces(mib: int):
    chunk = os.urandom(MAX_CHUNK)
    for _ in range(mib * 2**20 // MAX_CHUNK):
        yield chunk


def timed(task, node: str, *args) -> tuple[float, float]:
    start = time.perf_counter()
    stream = task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(*args)
    first = None
    for ref in stream:
        ray.get(ref)
        first = first or time.perf_counter() - start
    return first, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=None)
    parser.add_argument("--mib", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    ray.init(address=args.address, logging_level="error", log_to_driver=False)
    node = next(n["NodeID"] for n in ray.nodes() if n["Alive"])
    fresh = ray.remote(max_calls=1, max_retries=0, num_cpus=0)

    dispatch = [timed(fresh(one_event), node) for _ in range(args.repeat)]
    print(f"dispatch (fresh worker): first event {statistics.median(d[0] for d in dispatch):.2f} s, "
          f"end {statistics.median(d[1] for d in dispatch):.2f} s (median of {args.repeat})")
    _, seconds = timed(fresh(pieces), node, args.mib)
    print(f"transfer: {args.mib} MiB in {seconds:.2f} s = {args.mib / seconds:.0f} MiB/s")

    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(Path(tmp) / "ledger.sqlite")
        writes = []
        for _ in range(args.repeat * 20):
            row = ledger.add(kind="baseline", status=Status.PROPOSED, description="bench")
            start = time.perf_counter()
            ledger.transition(row.id, Status.BUILT)
            writes.append(time.perf_counter() - start)
        ledger.close()
    print(f"ledger: one transition {1000 * statistics.median(writes):.1f} ms (median of {len(writes)})")


if __name__ == "__main__":
    main()
