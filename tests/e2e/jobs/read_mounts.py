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

from job_common import session_builder, with_confs


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

    b = session_builder(a.master, "stoker-e2e-mounts").config("spark.executor.instances", str(a.executors))
    spark = with_confs(b, a.conf, p).getOrCreate()
    sc = spark.sparkContext
    print(json.dumps({"event": "started", "app_id": sc.applicationId}), flush=True)
    reads = sc.parallelize(range(4 * a.executors), 4 * a.executors).mapPartitions(probe).collect()
    print(json.dumps({"event": "result", "reads": reads}), flush=True)
    spark.stop()


if __name__ == "__main__":
    main()
