"""What the jobs here share: the `--conf KEY=VALUE` settings a test adds to a session, and the
session start that prints the `started` event (with the application id) the tests wait for."""
import json


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
