"""A Spark job whose executors read what their pod mounts: a file under $DATA_DIR (a hostPath
volume), the file `k` under $SECRET_DIR (a mounted secret) and $MY_SECRET (a secretKeyRef
environment variable). Prints JSON lines: "started" with the application id, then "result" with
what each executor read.

Usage: read_mounts.py MASTER [--executors N] [--conf KEY=VALUE ...]
MASTER is HOST:PORT of a stoker or a full Spark master URL (k8s://...).
"""
import argparse
import json
import os

from job_common import with_confs
from pyspark.sql import SparkSession


def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        return f"error: {e}"


def probe(_):
    return [{
        "executor": os.environ.get("SPARK_EXECUTOR_ID", "?"),
        "data": read(os.path.join(os.environ.get("DATA_DIR", "/nonexistent"), "input.txt")),
        "secret_file": read(os.path.join(os.environ.get("SECRET_DIR", "/nonexistent"), "k")),
        "secret_env": os.environ.get("MY_SECRET", "unset"),
    }]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("master")
    p.add_argument("--executors", type=int, default=1)
    p.add_argument("--conf", action="append", default=[], help="extra Spark setting KEY=VALUE")
    a = p.parse_args()

    master = a.master if "://" in a.master else f"spark+stoker://{a.master}"
    b = SparkSession.builder.master(master).appName("stoker-e2e-mounts")
    if master.startswith("spark+stoker://"):
        b = b.config("spark.driver.extraClassPath", os.environ["STOKER_PLUGIN_JAR"])
    b = with_confs(b, a.conf, p)
    spark = (
        b.config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.executor.memory", "512m")
        .config("spark.executor.cores", "1")
        .config("spark.executor.instances", str(a.executors))
        .config("spark.ui.enabled", "false")
        .config("spark.scheduler.minRegisteredResourcesRatio", "1.0")
        .config("spark.scheduler.maxRegisteredResourcesWaitingTime", "120s")
        .getOrCreate()
    )
    sc = spark.sparkContext
    print(json.dumps({"event": "started", "app_id": sc.applicationId}), flush=True)
    reads = sc.parallelize(range(4 * a.executors), 4 * a.executors).mapPartitions(probe).collect()
    print(json.dumps({"event": "result", "reads": reads}), flush=True)
    spark.stop()


if __name__ == "__main__":
    main()
