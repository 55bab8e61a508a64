"""A Spark job with a shuffle, run through stoker. Prints one JSON line with the result.

Usage: shuffle.py MASTER [--executors N] [--rows N] [--partitions N] [--slow-ms MS]
       [--dynamic] [--jobs N] [--pause-s S]
"""
import argparse
import json
import sys
import time

from job_common import session_builder, start, with_confs
from pyspark.sql import functions as F


def task_reruns(sc):
    """Task attempts that were, or will be, run again: each stage's failed tasks, and every task
    of a stage attempt after the first (a stage resubmitted after a lost shuffle output)."""
    tracker = sc.statusTracker()
    reruns = 0
    for job_id in tracker.getJobIdsForGroup():
        job = tracker.getJobInfo(job_id)
        for stage_id in job.stageIds if job else []:
            stage = tracker.getStageInfo(stage_id)
            if stage:
                reruns += stage.numFailedTasks
                if stage.currentAttemptId > 0:
                    reruns += stage.numTasks
    return reruns


def main():
    p = argparse.ArgumentParser()
    p.add_argument("master", help="HOST:PORT of a stoker, or a full Spark master URL (k8s://...)")
    p.add_argument("--executors", type=int, default=2)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--partitions", type=int, default=50)
    p.add_argument("--slow-ms", type=int, default=0, help="sleep per map partition (Python UDF)")
    p.add_argument("--dynamic", action="store_true")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--pause-s", type=float, default=0.0, help="idle time between jobs")
    p.add_argument("--max-failures", type=int, default=0)
    p.add_argument("--conf", action="append", default=[], help="extra Spark setting KEY=VALUE")
    a = p.parse_args()

    b = (
        session_builder(a.master, "stoker-e2e-shuffle")
        .config("spark.sql.shuffle.partitions", str(a.partitions))
        .config("spark.sql.adaptive.enabled", "false")
    )
    if a.max_failures:
        b = b.config("spark.executor.maxNumFailures", str(a.max_failures))
    if a.dynamic:
        b = (
            b.config("spark.dynamicAllocation.enabled", "true")
            .config("spark.dynamicAllocation.shuffleTracking.enabled", "true")
            .config("spark.dynamicAllocation.minExecutors", "0")
            .config("spark.dynamicAllocation.initialExecutors", "0")
            .config("spark.dynamicAllocation.maxExecutors", str(a.executors))
            .config("spark.dynamicAllocation.executorIdleTimeout", "3s")
            .config("spark.dynamicAllocation.shuffleTracking.timeout", "3s")
            .config("spark.dynamicAllocation.schedulerBacklogTimeout", "1s")
        )
    else:
        b = b.config("spark.executor.instances", str(a.executors))
    # Last, so that a test's --conf overrides the defaults above.
    spark = start(with_confs(b, a.conf, p))
    sc = spark.sparkContext

    results = []
    for job in range(a.jobs):
        if job and a.pause_s:
            print(json.dumps({"event": "idle", "job": job}), flush=True)
            time.sleep(a.pause_s)
        df = spark.range(0, a.rows, numPartitions=a.partitions)
        if a.slow_ms:
            slow_s = a.slow_ms / 1000.0

            def slow(rows):
                time.sleep(slow_s)
                return rows

            df = spark.createDataFrame(df.rdd.mapPartitions(slow), df.schema)
        print(json.dumps({"event": "job-start", "job": job}), flush=True)
        groups = (
            df.groupBy((F.col("id") % 1000).alias("k"))
            .agg(F.count("*").alias("n"), F.sum("id").alias("s"))
            .collect()
        )
        infos = sc._jsc.sc().statusTracker().getExecutorInfos()
        reruns = task_reruns(sc)
        results.append(
            {
                "groups": len(groups),
                "count": sum(r["n"] for r in groups),
                "sum": sum(r["s"] for r in groups),
                # getExecutorInfos includes the driver.
                "executors_alive": len(infos) - 1,
                # Tasks run again so far (failed attempts, resubmitted stages): 0 when executors
                # leave by decommissioning with their blocks migrated.
                "task_reruns": reruns,
            }
        )
        print(json.dumps({"event": "job-done", "job": job, **results[-1]}), flush=True)

    print(
        json.dumps({"event": "result", "results": results, "expected_count": a.rows,
                    "expected_sum": a.rows * (a.rows - 1) // 2}),
        flush=True,
    )
    spark.stop()


if __name__ == "__main__":
    sys.exit(main())
