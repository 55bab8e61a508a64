"""A job whose tasks need more JVM heap than spark.executor.memory=512m gives: each task builds
one string of --mib MiB in the executor's heap (Spark SQL's repeat(), never folded into a
constant because it depends on the row) and returns its length. With 512m the executor dies of
java.lang.OutOfMemoryError (exit code 52); under stoker with spark.stoker.resize.* its
replacement gets a bigger heap and the job finishes. Prints JSON lines: started, result.

Usage: heap_hog.py MASTER [--mib N] [--tasks N] [--conf KEY=VALUE ...]
MASTER: HOST:PORT of a stoker, or a full Spark master URL (k8s://... for Spark's own backend).
"""
import argparse
import json

from job_common import one_small_executor
from pyspark.sql import functions as F


def main():
    p = argparse.ArgumentParser()
    p.add_argument("master", help="HOST:PORT of a stoker, or a full Spark master URL (k8s://...)")
    p.add_argument("--mib", type=int, default=600, help="MiB one task holds in the heap")
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--conf", action="append", default=[], help="extra Spark setting KEY=VALUE")
    a = p.parse_args()

    spark = one_small_executor(a.master, "stoker-e2e-heap-hog", a.conf, p)
    sc = spark.sparkContext

    size = a.mib * 1024 * 1024
    rows = (
        spark.range(0, a.tasks, numPartitions=a.tasks)
        .select(F.expr(f"length(repeat('x', cast({size} + floor(rand() * 0.5) as int)))").alias("n"))
        .collect()
    )
    # What the driver believes each live executor has: the storage memory the executor's own
    # JVM reported when it registered (Spark's UI shows the same), not spark.executor.memory.
    jsc = sc._jsc.sc()
    driver_port = jsc.env().blockManager().blockManagerId().port()
    storage_mib = [
        info.totalOnHeapStorageMemory() // (1024 * 1024)
        for info in jsc.statusTracker().getExecutorInfos()
        if info.port() != driver_port
    ]
    print(
        json.dumps({"event": "result", "lengths": [r["n"] for r in rows], "storage_mib": storage_mib}),
        flush=True,
    )
    spark.stop()


if __name__ == "__main__":
    main()
