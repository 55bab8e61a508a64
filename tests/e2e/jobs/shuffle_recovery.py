"""A shuffle whose map outputs must survive the loss of an executor: the job writes a shuffle,
waits for the test to take one executor away, waits for its replacement, then reads the same
shuffle again and counts the map tasks that had to run again (a Python accumulator counts every
map task run). With on-demand claims reused and Spark's KubernetesLocalDiskShuffleDataIO, the
replacement finds the lost executor's shuffle files on the claim it took over and reports them,
so nothing is recomputed.

Events (one JSON line each): started, shuffled {executors}, lost {executor},
replaced {executor, seconds}, outputs {available, of, seconds}, result {...}.

Usage: shuffle_recovery.py MASTER [--executors N] [--maps N] [--conf K=V ...]
"""
import argparse
import json
import sys
import time

from job_common import executor_ids, session_builder, start, wait_for, with_confs

ROWS_PER_MAP = 20_000


def main():
    p = argparse.ArgumentParser()
    p.add_argument("master", help="HOST:PORT of a stoker, or a full Spark master URL (k8s://...)")
    p.add_argument("--executors", type=int, default=2)
    p.add_argument("--maps", type=int, default=8)
    p.add_argument("--recovery-timeout-s", type=float, default=90.0)
    p.add_argument("--conf", action="append", default=[], help="extra Spark setting KEY=VALUE")
    a = p.parse_args()

    b = (
        session_builder(a.master, "stoker-e2e-shuffle-recovery")
        .config("spark.executor.instances", str(a.executors))
        .config("spark.scheduler.maxRegisteredResourcesWaitingTime", "180s")
    )
    spark = start(with_confs(b, a.conf, p))
    sc = spark.sparkContext
    map_runs = sc.accumulator(0)

    def produce(index, rows):
        map_runs.add(1)
        for i in range(ROWS_PER_MAP):
            yield ((index * ROWS_PER_MAP + i) % 1000, 1)

    pairs = sc.parallelize(range(a.maps), a.maps).mapPartitionsWithIndex(produce)
    counts = pairs.reduceByKey(lambda x, y: x + y, 4)
    first = sorted(counts.collect())
    runs_first = map_runs.value
    print(json.dumps({"event": "shuffled", "executors": sorted(executor_ids(sc)),
                      "map_runs": runs_first}), flush=True)

    # The test takes one executor away now.
    before = executor_ids(sc)
    lost = wait_for(lambda: before - executor_ids(sc), 180)
    if not lost:
        print(json.dumps({"event": "error", "message": "no executor was lost within 180 s"}), flush=True)
        return 2
    lost_at = time.monotonic()
    print(json.dumps({"event": "lost", "executor": sorted(lost)[0]}), flush=True)
    new = wait_for(lambda: executor_ids(sc) - before, 180)
    if not new:
        print(json.dumps({"event": "error", "message": "no replacement within 180 s"}), flush=True)
        return 2
    print(json.dumps({"event": "replaced", "executor": sorted(new)[0],
                      "seconds": round(time.monotonic() - lost_at, 2)}), flush=True)

    # Spark loads an executor's shuffle components (and with them KubernetesLocalDiskShuffleDataIO's
    # recovery) when the executor first writes or reads shuffle data: small shuffles of their
    # own, run until the replacement has taken part in one (or the time is up), let it recover
    # and report what it finds; the driver's map output tracker then counts those outputs again.
    tracker = sc._jsc.sc().env().mapOutputTracker()

    def recovered():
        if tracker.getNumAvailableOutputs(0) == a.maps:
            return True
        sc.parallelize(range(32), 32).map(lambda x: (x, 1)).reduceByKey(lambda x, y: x + y, 2).count()
        return tracker.getNumAvailableOutputs(0) == a.maps

    available = wait_for(recovered, a.recovery_timeout_s)
    print(json.dumps({"event": "outputs", "available": tracker.getNumAvailableOutputs(0),
                      "of": a.maps, "recovered": bool(available),
                      "seconds": round(time.monotonic() - lost_at, 2)}), flush=True)
    second = sorted(counts.collect())
    print(json.dumps({
        "event": "result",
        "right": first == second and sum(n for _, n in first) == a.maps * ROWS_PER_MAP,
        "map_runs_first": runs_first,
        "maps_recomputed": map_runs.value - runs_first,
        "executors_alive": len(executor_ids(sc)),
    }), flush=True)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
