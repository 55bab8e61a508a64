"""End-to-end: the ways users start Spark, each with `--master spark+stoker://…` on the local
backend: spark-submit with a Python file, spark-submit with an application jar (--class),
spark-shell running a Scala script, and the spark-sql CLI. Each answer is checked, and stoker's
log shows the application (so the executors were stoker's, not local mode)."""
import json
import os
import re
import subprocess
import sys

from conftest import JAR, JOBS, wait_until

ROWS = 1_000_000
SUM = ROWS * (ROWS - 1) // 2


def spark_bin():
    import pyspark
    return os.path.join(os.path.dirname(pyspark.__file__), "bin")


def run(tool, stoker, *args, cwd, timeout=300, input=None):
    """Runs pyspark's bin/<tool> against `stoker` in `cwd` (spark-sql's Derby metastore and
    logs land there); its output."""
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable,
               SPARK_LOCAL_IP="127.0.0.1", STOKER_PLUGIN_JAR=str(JAR))
    env.pop("SPARK_HOME", None)
    command = [os.path.join(spark_bin(), tool), "--master", f"spark+stoker://{stoker.address}",
               "--driver-class-path", str(JAR),
               "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.driver.bindAddress=127.0.0.1",
               "--conf", "spark.executor.instances=2", "--conf", "spark.executor.memory=512m",
               "--conf", "spark.ui.enabled=false", *args]
    out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, input=input,
                         cwd=cwd)
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
