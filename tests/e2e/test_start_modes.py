"""End-to-end: the ways users start Spark, each with `--master spark+stoker://…` on the local
backend: spark-submit with a Python file, spark-submit with an application jar (--class),
spark-shell running a Scala script, the spark-sql CLI, and a Spark Connect server (the driver)
serving a thin Python client. Each answer is checked, and stoker's log shows the application (so
the executors were stoker's, not local mode)."""
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys

from conftest import JAR, JOBS, executor_pids, free_port, wait_until

ROWS = 1_000_000
SUM = ROWS * (ROWS - 1) // 2


def spark_bin():
    import pyspark
    return os.path.join(os.path.dirname(pyspark.__file__), "bin")


def spark_env():
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable,
               SPARK_LOCAL_IP="127.0.0.1", STOKER_PLUGIN_JAR=str(JAR))
    env.pop("SPARK_HOME", None)
    return env


def command(tool, stoker, *args):
    """pyspark's bin/<tool> with stoker as master: the plugin on the driver's class path, the
    driver on loopback, two static executors, and whatever settings `stoker.driver_args()`
    adds (the Kubernetes backend's: TLS, the driver's token, namespace, image)."""
    return [os.path.join(spark_bin(), tool), "--master", f"spark+stoker://{stoker.address}",
            "--driver-class-path", str(JAR),
            "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.driver.bindAddress=127.0.0.1",
            "--conf", "spark.executor.instances=2", "--conf", "spark.executor.memory=512m",
            "--conf", "spark.ui.enabled=false", *getattr(stoker, "driver_args", list)(), *args]


def run(tool, stoker, *args, cwd, timeout=300, input=None):
    """Runs pyspark's bin/<tool> against `stoker` in `cwd` (spark-sql's Derby metastore and
    logs land there); its output."""
    out = subprocess.run(command(tool, stoker, *args), capture_output=True, text=True, timeout=timeout,
                         env=spark_env(), input=input, cwd=cwd)
    assert out.returncode == 0, f"{tool} failed ({out.returncode}):\n{out.stderr[-6000:]}"
    return out


def registered(stoker, n):
    """stoker registered n applications (so the driver used the plugin, not local mode)."""
    wait_until(lambda: stoker.log_path.read_text().count("application registered") >= n, 10,
               f"{n} application(s) registered with stoker")


def test_spark_submit_with_a_python_file(stoker, work_dir):
    out = run("spark-submit", stoker, str(JOBS / "shuffle.py"), f"spark+stoker://{stoker.address}",
              "--executors", "2", cwd=work_dir)
    result = next(json.loads(l) for l in out.stdout.splitlines() if l.startswith('{"event": "result"'))
    r = result["results"][0]
    assert (r["groups"], r["count"], r["sum"]) == (1000, ROWS, SUM)
    registered(stoker, 1)


def test_spark_submit_with_an_application_jar(stoker, work_dir):
    classes = work_dir / "classes"
    classes.mkdir()
    jars = os.path.join(os.path.dirname(spark_bin()), "jars", "*")
    subprocess.run(["javac", "-cp", jars, "-d", str(classes), str(JOBS / "SumJob.java")], check=True,
                   capture_output=True, timeout=120)
    app_jar = work_dir / "sum-job.jar"
    subprocess.run(["jar", "cf", str(app_jar), "-C", str(classes), "."], check=True, timeout=60)
    out = run("spark-submit", stoker, "--class", "SumJob", str(app_jar), str(ROWS), cwd=work_dir)
    result = json.loads(next(l for l in out.stdout.splitlines() if l.startswith('{"event": "result"')))
    assert (result["groups"], result["sum"]) == (1000, SUM), result
    registered(stoker, 1)


def test_spark_shell_runs_a_scala_script(stoker, work_dir):
    script = work_dir / "sum.scala"
    script.write_text(
        f'val r = spark.range({ROWS}L).selectExpr("id % 1000 AS g", "id").groupBy("g").sum("id")'
        '.selectExpr("count(*)", "sum(`sum(id)`)").collect()(0)\n'
        'println(s"RESULT ${r.getLong(0)} ${r.getLong(1)} ${sc.applicationId}")\n'
        "System.exit(0)\n")
    out = run("spark-shell", stoker, "-i", str(script), input="", cwd=work_dir)
    found = re.search(r"RESULT (\d+) (\d+) (\S+)", out.stdout)
    assert found, out.stdout[-3000:] + out.stderr[-3000:]
    assert (int(found.group(1)), int(found.group(2))) == (1000, SUM)
    registered(stoker, 1)


def test_spark_sql_cli(stoker, work_dir):
    out = run("spark-sql", stoker,
              "--conf", f"spark.sql.warehouse.dir={work_dir / 'warehouse'}",
              "--conf", f"spark.driver.extraJavaOptions=-Dderby.system.home={work_dir / 'derby'}",
              "-e", f"SELECT count(DISTINCT id % 1000), sum(id) FROM range({ROWS})", cwd=work_dir)
    rows = [l.split("\t") for l in out.stdout.strip().splitlines() if "\t" in l]
    assert rows == [["1000", str(SUM)]], out.stdout[-2000:]
    registered(stoker, 1)


@contextlib.contextmanager
def connect_server(stoker, work_dir, *args):
    """A Spark Connect server whose master is `stoker`, started as sbin/start-connect-server.sh
    does but in the foreground (the pyspark package ships the server's jar, not that script),
    listening on 127.0.0.1 only; yields its sc:// URL once it listens, and stops it at the end
    (SIGTERM, as stop-connect-server.sh does), which stops its SparkContext."""
    port = free_port()
    log_path = work_dir / "connect-server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            command("spark-submit", stoker,
                    "--class", "org.apache.spark.sql.connect.service.SparkConnectServer",
                    "--name", "Spark Connect server",
                    "--conf", "spark.connect.grpc.binding.address=127.0.0.1",
                    "--conf", f"spark.connect.grpc.binding.port={port}", *args),
            stdout=log, stderr=subprocess.STDOUT, env=spark_env(), cwd=work_dir, start_new_session=True)
    try:
        def listening():
            if server.poll() is not None:
                raise AssertionError(f"Connect server exited {server.returncode}:\n"
                                     f"{log_path.read_text()[-6000:]}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        wait_until(listening, 180, "the Spark Connect server to listen")
        yield f"sc://127.0.0.1:{port}"
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
            raise AssertionError(f"Connect server did not stop in 60 s:\n{log_path.read_text()[-6000:]}")


def connect_query(stoker, remote, work_dir):
    """A thin Python client (no JVM) runs a query with a shuffle on the server; its answer is
    checked and returned with the server's application id."""
    out = subprocess.run([sys.executable, str(JOBS / "connect_client.py"), remote, "--rows", str(ROWS)],
                         capture_output=True, text=True, timeout=300, env=spark_env(), cwd=work_dir)
    assert out.returncode == 0, f"client failed ({out.returncode}):\n{out.stderr[-6000:]}"
    result = json.loads(next(l for l in out.stdout.splitlines() if l.startswith('{"event": "result"')))
    assert result["connect_session"] == "pyspark.sql.connect.session", result
    assert (result["groups"], result["count"], result["sum"]) == (1000, ROWS, SUM), result
    assert result["master"] == f"spark+stoker://{stoker.address}", result
    return result


def finished_tasks(work_dir, app_id, names=None):
    """Tasks finished by the application's executors (those whose log is named in `names`, or
    all), from their logs in stoker's work dir."""
    return sum(log.read_text().count("Executor: Finished task")
               for log in (work_dir / app_id).glob("executor-*.log") if names is None or log.name in names)


def test_spark_connect_server_runs_client_queries_on_stoker_executors(stoker, work_dir):
    """A long-lived Spark Connect server with two static executors from stoker; a thin client's
    query runs on them."""
    with connect_server(stoker, work_dir) as remote:
        registered(stoker, 1)
        result = connect_query(stoker, remote, work_dir)

        # The server's application is stoker's; its two executors run as stoker's processes, and
        # they ran the query's tasks.
        app_id = result["app_id"]
        assert app_id in stoker.apps(), stoker.cli("apps").stdout
        shown = stoker.cli("executors", app_id)
        assert shown.returncode == 0, shown.stderr
        # EXECUTOR PROFILE STATE HOST BACKEND ...: BACKEND is pid:<executor JVM>
        rows = [l.split() for l in shown.stdout.splitlines()[1:] if l[:1].isdigit()]
        assert [r[2] for r in rows] == ["RUNNING", "RUNNING"], shown.stdout
        assert sorted(int(r[4].removeprefix("pid:")) for r in rows) == executor_pids(work_dir), shown.stdout
        finished = finished_tasks(work_dir, app_id)
        assert finished >= 8, f"{finished} tasks finished in stoker's executor logs (8 map tasks at least)"
    wait_until(lambda: not executor_pids(work_dir), 30, "executor processes to end with the server")


# Dynamic allocation from zero to two executors, released 3 s after they idle.
DYNAMIC_FROM_ZERO = ["--conf", "spark.executor.instances=0",  # overrides command()'s static 2
                     "--conf", "spark.dynamicAllocation.enabled=true",
                     "--conf", "spark.dynamicAllocation.shuffleTracking.enabled=true",
                     "--conf", "spark.dynamicAllocation.minExecutors=0",
                     "--conf", "spark.dynamicAllocation.initialExecutors=0",
                     "--conf", "spark.dynamicAllocation.maxExecutors=2",
                     "--conf", "spark.dynamicAllocation.executorIdleTimeout=3s",
                     "--conf", "spark.dynamicAllocation.shuffleTracking.timeout=3s"]


def test_spark_connect_server_with_dynamic_allocation_scales_with_client_queries(stoker, work_dir):
    """The same server with dynamic allocation from zero: a client's query brings executors from
    stoker, the idle server gives them all back while it keeps serving, and the next client's
    query brings new ones."""
    with connect_server(stoker, work_dir, *DYNAMIC_FROM_ZERO) as remote:
        registered(stoker, 1)
        assert not executor_pids(work_dir), "executors before any query"
        first = connect_query(stoker, remote, work_dir)
        app_id = first["app_id"]
        logs = sorted(p.name for p in (work_dir / app_id).glob("executor-*.log"))
        assert logs and finished_tasks(work_dir, app_id) >= 8, logs

        # Idle: every executor is released, and the server (and its application) stays.
        wait_until(lambda: not executor_pids(work_dir), 60, "the idle server's executors to be released")
        assert app_id in stoker.apps(), stoker.cli("apps").stdout
        # The processes are gone before stoker has reaped them; its view follows within moments.
        wait_until(
            lambda: (shown := stoker.cli("executors", app_id)).returncode == 0 and "RUNNING" not in shown.stdout,
            30,
            "stoker to show no running executor of the idle server",
        )

        second = connect_query(stoker, remote, work_dir)
        assert second["app_id"] == app_id
        more = sorted(p.name for p in (work_dir / app_id).glob("executor-*.log"))
        assert set(more) > set(logs), f"no new executor for the second query: {logs} then {more}"
        assert finished_tasks(work_dir, app_id, set(more) - set(logs)) >= 8, more
    wait_until(lambda: not executor_pids(work_dir), 30, "executor processes to end with the server")
