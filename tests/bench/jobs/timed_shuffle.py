"""The e2e shuffle job with timings: time to the first running task and total time.

Usage: timed_shuffle.py MASTER --executors N [--conf K=V ...]
Prints {"event": "result", "t_start", "t_context", "t_first_task", "t_done", "correct"}.
"""
import argparse
import json
import os
import sys
import threading
import time

T_START = time.time()

from pyspark.sql import SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("master")
    p.add_argument("--executors", type=int, default=4)
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--partitions", type=int, default=40)
    p.add_argument("--conf", action="append", default=[])
    a = p.parse_args()
    b = SparkSession.builder.master(a.master).appName("stoker-bench-shuffle")
    if a.master.startswith("spark+stoker://"):
        b = b.config("spark.driver.extraClassPath", os.environ["STOKER_PLUGIN_JAR"])
    for kv in a.conf:
        k, _, v = kv.partition("=")
        b = b.config(k, v)
    spark = (
        b.config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.executor.instances", str(a.executors))
        .config("spark.executor.memory", "512m")
        .config("spark.executor.cores", "1")
        .config("spark.sql.shuffle.partitions", str(a.partitions))
        .config("spark.sql.adaptive.enabled", "false")
        # Start the job at once: the time to the first task then includes executor start-up.
        .config("spark.scheduler.minRegisteredResourcesRatio", "0")
        .getOrCreate()
    )
    t_context = time.time()
    sc = spark.sparkContext
    first = {}

    def watch_tasks():
        tracker = sc.statusTracker()
        while "t" not in first:
            for sid in tracker.getActiveStageIds():
                info = tracker.getStageInfo(sid)
                if info and (info.numActiveTasks > 0 or info.numCompletedTasks > 0):
                    first["t"] = time.time()
                    return
            time.sleep(0.05)

    threading.Thread(target=watch_tasks, daemon=True).start()
    df = spark.range(0, a.rows, numPartitions=a.partitions)
    rows = df.groupBy((F.col("id") % 1000).alias("k")).agg(F.count("*").alias("n"), F.sum("id").alias("s")).collect()
    t_done = time.time()
    correct = (len(rows) == 1000 and sum(r["n"] for r in rows) == a.rows
               and sum(r["s"] for r in rows) == a.rows * (a.rows - 1) // 2)
    print(json.dumps({"event": "result", "t_start": T_START, "t_context": t_context,
                      "t_first_task": first.get("t"), "t_done": t_done, "correct": correct}), flush=True)
    spark.stop()


if __name__ == "__main__":
    sys.exit(main())
