"""A Spark driver that runs one shuffle job with a known answer on real executors, then holds them
until told to stop (the fault matrix's case g: faults land while the job runs).

Usage: job.py MASTER --executors N --stop-file PATH [--rows R] [--partitions P] [--slow-ms MS]
              [--max-seconds S] [--conf K=V ...]
Prints JSON lines: {"event": "ready", "app_id"} once the SparkContext is up and its executors
registered, {"event": "job-start"} before the job, {"event": "task-done", "n"} as map partitions
finish (from the job's own accumulator, polled), {"event": "result", ...} with the answer and the
expected one, then waits for PATH to exist and stops the context cleanly.
"""
import argparse
import json
import os
import sys
import threading
import time

from pyspark.sql import SparkSession
from pyspark.sql import functions as F


def emit(**kv):
    print(json.dumps(kv), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("master")
    p.add_argument("--executors", type=int, required=True)
    p.add_argument("--stop-file", required=True)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--partitions", type=int, default=40)
    p.add_argument("--slow-ms", type=int, default=2000, help="sleep per map partition")
    p.add_argument("--max-seconds", type=float, default=900)
    p.add_argument("--conf", action="append", default=[])
    a = p.parse_args()
    b = SparkSession.builder.master(a.master).appName("stoker-chaos-job")
    b = b.config("spark.driver.extraClassPath", os.environ["STOKER_PLUGIN_JAR"])
    for kv in a.conf:
        k, sep, v = kv.partition("=")
        if not sep:
            p.error(f"--conf needs KEY=VALUE: {kv!r}")
        b = b.config(k, v)
    b = (
        b.config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.executor.instances", str(a.executors))
        .config("spark.executor.memory", "512m")
        .config("spark.executor.cores", "1")
        .config("spark.driver.memory", "512m")
        .config("spark.sql.shuffle.partitions", "8")
        .config("spark.sql.adaptive.enabled", "false")
        # The job starts on all its executors.
        .config("spark.scheduler.minRegisteredResourcesRatio", "1.0")
        .config("spark.scheduler.maxRegisteredResourcesWaitingTime", "180s")
    )
    spark = b.getOrCreate()
    sc = spark.sparkContext
    emit(event="ready", t=time.time(), app_id=sc.applicationId)

    done = sc.accumulator(0)
    slow_s = a.slow_ms / 1000.0

    def slow(rows):
        time.sleep(slow_s)
        done.add(1)
        return rows

    df = spark.range(0, a.rows, numPartitions=a.partitions)
    df = spark.createDataFrame(df.rdd.mapPartitions(slow), df.schema)
    stop_poll = threading.Event()

    def poll():
        last = -1
        while not stop_poll.wait(0.2):
            if done.value != last:
                last = done.value
                emit(event="task-done", n=last)
    threading.Thread(target=poll, daemon=True).start()
    emit(event="job-start", t=time.time())
    groups = (df.groupBy((F.col("id") % 1000).alias("k"))
              .agg(F.count("*").alias("n"), F.sum("id").alias("s")).collect())
    stop_poll.set()
    emit(event="result", t=time.time(), groups=len(groups), count=sum(r["n"] for r in groups),
         sum=sum(r["s"] for r in groups), expected_groups=1000, expected_count=a.rows,
         expected_sum=a.rows * (a.rows - 1) // 2)
    deadline = time.monotonic() + a.max_seconds
    while not os.path.exists(a.stop_file) and time.monotonic() < deadline:
        time.sleep(0.2)
    spark.stop()
    emit(event="stopped", t=time.time())


if __name__ == "__main__":
    sys.exit(main())
