"""An application that asks for one executor more than its on-demand claims allow
(`spark.kubernetes.driver.waitToReusePersistentVolumeClaim`): it starts with N executors, asks
for one more (SparkContext.requestTotalExecutors), waits for the test's go-ahead (a file), kills its
first executor (SparkContext.killExecutor), waits for the new executor to register, and runs a
small job on what it has.

Events (one JSON line each): started, running {executors}, asked, killed {executor},
joined {executor}, result {right, executors}.

Usage: claim_wait.py MASTER --go FILE [--executors N] [--conf K=V ...]
"""
import argparse
import json
import os

from job_common import executor_ids, session_builder, start, wait_for, with_confs


def waited(predicate, timeout_s, what):
    """`predicate`'s first truthy value within `timeout_s`; the job stops naming `what` if none."""
    got = wait_for(predicate, timeout_s)
    if not got:
        raise SystemExit(f"timed out after {timeout_s}s waiting for {what}")
    return got


def say(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("master", help="HOST:PORT of a stoker, or a full Spark master URL (k8s://...)")
    p.add_argument("--go", required=True, help="file the test creates when the job may go on")
    p.add_argument("--executors", type=int, default=2)
    p.add_argument("--conf", action="append", default=[], help="extra Spark setting KEY=VALUE")
    a = p.parse_args()

    b = session_builder(a.master, "stoker-e2e-claim-wait").config("spark.executor.instances", str(a.executors))
    spark = start(with_confs(b, a.conf, p))
    sc = spark.sparkContext
    first = waited(lambda: ids if len(ids := executor_ids(sc)) == a.executors else None, 180,
                     f"{a.executors} executors")
    say("running", executors=sorted(first, key=int))
    # requestTotalExecutors, not requestExecutors(1): under static allocation Spark's backend
    # starts its requested total at 0, so requestExecutors(1) would ask for 1 in all.
    no_locality = sc._jvm.PythonUtils.toScalaMap(sc._jvm.java.util.HashMap())
    assert sc._jsc.sc().requestTotalExecutors(a.executors + 1, 0, no_locality), "requestTotalExecutors refused"
    say("asked")
    waited(lambda: os.path.exists(a.go), 240, f"the test's go-ahead ({a.go})")
    victim = min(first, key=int)
    assert sc._jsc.sc().killExecutor(victim), f"killExecutor({victim}) refused"
    say("killed", executor=victim)
    joined = waited(lambda: executor_ids(sc) - first, 180, "the new executor to register")
    say("joined", executor=sorted(joined, key=int)[0])
    total = sc.parallelize(range(1000), 4).map(lambda x: x * 2).sum()
    say("result", right=total == 999 * 1000, executors=sorted(executor_ids(sc), key=int))
    spark.stop()


if __name__ == "__main__":
    main()
