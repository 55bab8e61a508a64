"""A job whose tasks need more memory than the executor container has, outside the JVM heap:
each of --tasks tasks runs in a PySpark Python worker (an RDD mapPartitions) that builds a
bytearray of --mib MiB, writes every page of it, holds it for --hold-ms and returns its length.
With spark.executor.memory=512m the pod's limit is 896 MiB (512 heap + 384 overhead); the JVM
and the worker together go over it and the container is OOM-killed (exit code 137, OOMKilled).
The heap is not what runs out, so a bigger heap would not help; under stoker the replacement gets
more overhead. Prints JSON lines: started, result.

Usage: python_hog.py MASTER [--mib N] [--tasks N] [--hold-ms N] [--conf KEY=VALUE ...]
MASTER: HOST:PORT of a stoker, or a full Spark master URL (k8s://... for Spark's own backend).
"""
import argparse
import json

from job_common import one_small_executor


def hog(mib, hold_ms):
    """The task: `mib` MiB written page by page in this Python worker, held, then let go."""

    def run(rows):
        import time

        chunk = b"x" * (1 << 20)
        buf = bytearray(mib << 20)
        view = memoryview(buf)
        for off in range(0, len(buf), 1 << 20):
            view[off:off + (1 << 20)] = chunk
        time.sleep(hold_ms / 1000)
        n = len(buf)
        del view, buf
        for _ in rows:
            pass
        yield n

    return run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("master", help="HOST:PORT of a stoker, or a full Spark master URL (k8s://...)")
    p.add_argument("--mib", type=int, default=700, help="MiB one task holds in its Python worker")
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--hold-ms", type=int, default=2000, help="how long a task holds its memory")
    p.add_argument("--conf", action="append", default=[], help="extra Spark setting KEY=VALUE")
    a = p.parse_args()

    spark = one_small_executor(a.master, "stoker-e2e-python-hog", a.conf, p)
    sc = spark.sparkContext
    lengths = sc.parallelize(range(a.tasks), a.tasks).mapPartitions(hog(a.mib, a.hold_ms)).collect()
    print(json.dumps({"event": "result", "lengths": lengths}), flush=True)
    spark.stop()


if __name__ == "__main__":
    main()
