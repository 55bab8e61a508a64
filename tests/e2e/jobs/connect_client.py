"""A thin Spark Connect client: runs a query with a shuffle on a Spark Connect server and prints
one JSON line with the answer and the server's application id (the server is the Spark driver;
this process runs no JVM).

Usage: connect_client.py sc://HOST:PORT [--rows N]
"""
import argparse
import json

from pyspark.sql import SparkSession
from pyspark.sql import functions as F


def main():
    p = argparse.ArgumentParser()
    p.add_argument("remote", help="sc://HOST:PORT of a Spark Connect server")
    p.add_argument("--rows", type=int, default=1_000_000)
    args = p.parse_args()

    spark = SparkSession.builder.remote(args.remote).getOrCreate()
    try:
        # Two stages: a map over 8 partitions, then an aggregation after a shuffle by group.
        groups = (spark.range(0, args.rows, 1, 8)
                  .select((F.col("id") % 1000).alias("g"), "id")
                  .groupBy("g").agg(F.count("*").alias("n"), F.sum("id").alias("s")))
        row = groups.agg(F.count("*").alias("groups"), F.sum("n").alias("count"),
                         F.sum("s").alias("sum")).collect()[0]
        print(json.dumps({
            "event": "result",
            "connect_session": type(spark).__module__,
            "app_id": spark.conf.get("spark.app.id"),
            "master": spark.conf.get("spark.master"),
            "groups": row["groups"], "count": row["count"], "sum": row["sum"],
        }), flush=True)
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
