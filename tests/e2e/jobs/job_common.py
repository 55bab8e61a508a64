"""What the jobs here share: the `--conf KEY=VALUE` settings a test adds to a session, the
session start that prints the `started` event (with the application id) the tests wait for, and
the one-small-executor session of the memory-hungry jobs, and the driver-side polls of the jobs
that watch their executors come and go."""
import json
import os
import time


def with_confs(builder, confs, parser):
    """`builder` with each KEY=VALUE of `confs` set; a malformed one stops the job naming it."""
    for kv in confs:
        key, sep, value = kv.partition("=")
        if not sep:
            parser.error(f"--conf needs KEY=VALUE, got {kv!r}")
        builder = builder.config(key, value)
    return builder


def start(builder):
    """Starts the session and prints {"event": "started", "app_id": ...}."""
    spark = builder.getOrCreate()
    print(json.dumps({"event": "started", "app_id": spark.sparkContext.applicationId}), flush=True)
    return spark


def session_builder(master, app_name):
    """A SparkSession builder for `master` (HOST:PORT of a stoker, whose plugin jar comes from
    $STOKER_PLUGIN_JAR, or a full Spark master URL such as k8s://...): the driver on loopback,
    executors of spark.executor.memory=512m and 1 core, no UI, and the job waits (up to 120 s)
    for all its executors before it starts."""
    from pyspark.sql import SparkSession

    master = master if "://" in master else f"spark+stoker://{master}"
    b = SparkSession.builder.master(master).appName(app_name)
    if master.startswith("spark+stoker://"):
        b = b.config("spark.driver.extraClassPath", os.environ["STOKER_PLUGIN_JAR"])
    return (
        b.config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.executor.memory", "512m")
        .config("spark.executor.cores", "1")
        .config("spark.ui.enabled", "false")
        .config("spark.scheduler.minRegisteredResourcesRatio", "1.0")
        .config("spark.scheduler.maxRegisteredResourcesWaitingTime", "120s")
    )


def one_small_executor(master, app_name, confs, parser):
    """A started session with one executor of spark.executor.memory=512m and 1 core, waiting
    for it before the job (see session_builder)."""
    b = session_builder(master, app_name).config("spark.executor.instances", "1")
    return start(with_confs(b, confs, parser))


def executor_ids(sc):
    """Ids of the executors registered with the driver now."""
    return {i for i in sc._jsc.sc().getExecutorIds().mkString(",").split(",") if i}


def wait_for(predicate, timeout_s):
    """Polls `predicate` (0.2 s) until it returns something truthy or `timeout_s` passes (None)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.2)
    return None
