"""A Spark driver that asks for executors and holds them until told to stop (benchmarks).

Usage: hold.py MASTER --executors N --stop-file PATH [--max-seconds S] [--backlog TASKS] [--conf K=V ...]
Prints one JSON line {"event": "ready", "t": <unix time>} once the SparkContext is up (the
backend has started and asked for its executors), then waits for PATH to exist (or S seconds)
and stops the context cleanly. --backlog submits, from a thread of its own, one job of TASKS
tasks that each sleep for an hour: with dynamic allocation its backlog keeps the driver asking
for executors up to spark.dynamicAllocation.maxExecutors (the job is cancelled by the stop).
--then N: once a line `go` arrives on standard input, asks for N executors in all and prints
{"event": "asked", ...}: a ramp asked by a driver whose JVM is already up.
"""
import argparse
import json
import os
import select
import sys
import threading
import time

from pyspark.sql import SparkSession


def main():
    p = argparse.ArgumentParser()
    p.add_argument("master")
    p.add_argument("--executors", type=int, required=True)
    p.add_argument("--stop-file", required=True)
    p.add_argument("--max-seconds", type=float, default=900)
    p.add_argument("--conf", action="append", default=[])
    p.add_argument("--backlog", type=int, default=0, help="tasks of a job that keeps a backlog (see above)")
    p.add_argument("--then", type=int, default=0,
                   help="once a line `go` arrives on standard input, ask for this many executors in all "
                        "(SparkContext.requestTotalExecutors): a ramp from a driver that is already up")
    p.add_argument("--light", action="store_true",
                   help="small driver JVM (serial GC, C1 only, heap grown on demand) so 50 drivers fit on one machine")
    a = p.parse_args()
    b = SparkSession.builder.master(a.master).appName("stoker-bench-hold")
    if a.master.startswith("spark+stoker://"):
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
        # 512m is the least Spark accepts (its memory manager wants 1.5 x 300 MiB reserved).
        .config("spark.driver.memory", "512m")
        # Do not wait for executors to register: in the process-less test bed they never do.
        .config("spark.scheduler.minRegisteredResourcesRatio", "0")
        .config("spark.executor.maxNumFailures", "100000")
    )
    if a.light:
        b = b.config("spark.driver.extraJavaOptions",
                     "-Xms32m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:ReservedCodeCacheSize=64m -Xss512k")
    spark = b.getOrCreate()
    if a.backlog:
        sc = spark.sparkContext

        def backlog():
            try:
                sc.parallelize(range(a.backlog), a.backlog).foreach(lambda _: time.sleep(3600))
            except Exception:  # noqa: BLE001 - cancelled by spark.stop(): the job is only a backlog
                pass
        threading.Thread(target=backlog, daemon=True, name="backlog").start()
    print(json.dumps({"event": "ready", "t": time.time(), "app_id": spark.sparkContext.applicationId}),
          flush=True)
    deadline = time.monotonic() + a.max_seconds
    if a.then:
        # The go-ahead is an event on stdin, waited for until the deadline.
        ready, _, _ = select.select([sys.stdin], [], [], max(deadline - time.monotonic(), 0))
        if not ready or sys.stdin.readline().strip() != "go":
            spark.stop()
            print("no go-ahead on stdin before the deadline", file=sys.stderr)
            return 1
        sc = spark.sparkContext
        # requestTotalExecutors, not requestExecutors: under static allocation Spark's backend
        # starts its requested total at 0.
        no_locality = sc._jvm.PythonUtils.toScalaMap(sc._jvm.java.util.HashMap())
        if not sc._jsc.sc().requestTotalExecutors(a.then, 0, no_locality):
            spark.stop()
            print("requestTotalExecutors refused", file=sys.stderr)
            return 1
        print(json.dumps({"event": "asked", "t": time.time(), "executors": a.then}), flush=True)
    while not os.path.exists(a.stop_file) and time.monotonic() < deadline:
        time.sleep(0.2)
    spark.stop()
    print(json.dumps({"event": "stopped", "t": time.time()}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
