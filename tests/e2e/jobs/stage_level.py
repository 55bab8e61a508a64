"""Stage-level scheduling with a non-default resource profile, through stoker: Spark's own
ResourceProfileManager decides whether the master supports it. Prints JSON lines: started, result
(the answer of a plain job, and the error a job with a new resource profile got, if any).

Usage: stage_level.py HOST:PORT [--conf KEY=VALUE ...]
"""
import argparse
import json
import os

from py4j.protocol import Py4JJavaError
from pyspark.resource import ExecutorResourceRequests, ResourceProfileBuilder, TaskResourceRequests
from job_common import start, with_confs
from pyspark.sql import SparkSession


def main():
    p = argparse.ArgumentParser()
    p.add_argument("master", help="HOST:PORT of a stoker")
    p.add_argument("--conf", action="append", default=[], help="extra Spark setting KEY=VALUE")
    a = p.parse_args()
    b = (
        SparkSession.builder.master(f"spark+stoker://{a.master}")
        .appName("stoker-e2e-stage-level")
        .config("spark.driver.extraClassPath", os.environ["STOKER_PLUGIN_JAR"])
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.executor.cores", "1")
        .config("spark.ui.enabled", "false")
        # Dynamic allocation on, as Spark requires for a non-default profile on YARN and Kubernetes.
        .config("spark.dynamicAllocation.enabled", "true")
        .config("spark.dynamicAllocation.shuffleTracking.enabled", "true")
        .config("spark.dynamicAllocation.maxExecutors", "2")
    )
    spark = start(with_confs(b, a.conf, p))
    sc = spark.sparkContext
    plain = sc.parallelize(range(1000), 4).sum()
    profile = (ResourceProfileBuilder()
               .require(ExecutorResourceRequests().cores(2).memory("600m"))
               .require(TaskResourceRequests().cpus(1))
               .build)
    error = None
    try:
        sc.parallelize(range(1000), 4).withResources(profile).sum()
    except Py4JJavaError as e:
        error = str(e.java_exception)
    print(json.dumps({"event": "result", "plain_sum": plain, "profile_error": error}), flush=True)
    spark.stop()


if __name__ == "__main__":
    main()
