"""End-to-end: executors get the driver's Hadoop delegation tokens under stoker, as under Spark's
own YARN and Kubernetes backends (StokerSchedulerBackend.createTokenManager).

With Hadoop security on (hadoop.security.authentication=kerberos in the driver's core-site.xml),
Spark's CoarseGrainedSchedulerBackend.start() asks the backend for a token manager; with one,
the driver's current Hadoop credentials (here: a token of kind STOKER_TEST with a service name
unique to the test, loaded from HADOOP_TOKEN_FILE_LOCATION as a launcher hands them over) are
serialized and kept by the driver endpoint, which sends them to every executor in its
SparkAppConfig when it registers (and UpdateDelegationTokens later). That is the only way the
token reaches an executor: with no token manager (Spark's default createTokenManager, None)
executors run with no token at all, and the test fails. No KDC: a ticket-less Kerberos login
of the driver is enough for this path (the token manager obtains new tokens from
HadoopDelegationTokenProviders only for a user with Kerberos credentials, so the providers and
renewal stay untested).

A Java job (jobs/tokens/TokensJob.java, compiled at test time) reports, from tasks on every
executor, the tokens of the Hadoop user the tasks run as. On the local backend (executors as
stoker's processes) and, marked `long`, on the Kubernetes test bed (executor pods), there after
the same job under Spark's own Kubernetes backend."""
import json
import os
import subprocess
import uuid

import pytest

from conftest import JOBS, wait_until
import test_kubernetes
from test_kubernetes import k8s_args, kube  # noqa: F401  (kube: a fixture)
import test_start_modes as modes  # a module, not its tests: they would be collected here again

TOKEN_KIND = "STOKER_TEST"
EXECUTORS = 2

# Hadoop security on for the driver (UserGroupInformation reads core-site.xml from the class
# path, where spark-submit puts HADOOP_CONF_DIR).
CORE_SITE = """<?xml version="1.0"?>
<configuration>
  <property><name>hadoop.security.authentication</name><value>kerberos</value></property>
</configuration>
"""

# Kerberos names need a default realm; no KDC is ever asked (the driver has no ticket).
KRB5_CONF = """[libdefaults]
  default_realm = STOKER.TEST
"""

# What every executor logs as it adds the tokens of its SparkAppConfig (SparkHadoopUtil).
EXECUTOR_ADDS_TOKENS = "SparkHadoopUtil: Updating delegation tokens for current user."


def tokens_job(work_dir):
    """TokensJob compiled against pyspark's jars: (its jar, its class path for a plain JVM)."""
    classes = work_dir / "token-classes"
    classes.mkdir()
    jars = os.path.join(os.path.dirname(modes.spark_bin()), "jars", "*")
    subprocess.run(["javac", "-cp", jars, "-d", str(classes), str(JOBS / "tokens" / "TokensJob.java")],
                   check=True, capture_output=True, timeout=120)
    app_jar = work_dir / "tokens-job.jar"
    subprocess.run(["jar", "cf", str(app_jar), "-C", str(classes), "."], check=True, timeout=60)
    return app_jar, f"{classes}:{jars}"


def submit_with_a_token(stoker, work_dir):
    """spark-submit of TokensJob against `stoker` (any object test_start_modes' command() takes;
    with a `master`, that master URL instead of stoker's),
    its driver holding a token of kind STOKER_TEST with a fresh service name, Hadoop security on;
    (the job's result, that service name)."""
    app_jar, class_path = tokens_job(work_dir)
    service = f"stoker-e2e-{uuid.uuid4().hex}"
    token_file = work_dir / "driver.tokens"
    subprocess.run(["java", "-cp", class_path, "TokensJob", "write-token-file", str(token_file), TOKEN_KIND,
                    service], check=True, capture_output=True, timeout=120)
    hadoop_conf = work_dir / "hadoop-conf"
    hadoop_conf.mkdir()
    (hadoop_conf / "core-site.xml").write_text(CORE_SITE)
    krb5_conf = work_dir / "krb5.conf"
    krb5_conf.write_text(KRB5_CONF)
    # Only the driver's environment has the token file and the Hadoop configuration.
    env = dict(modes.spark_env(), HADOOP_CONF_DIR=str(hadoop_conf), HADOOP_TOKEN_FILE_LOCATION=str(token_file))
    command = modes.command("spark-submit", stoker, "--driver-java-options", f"-Djava.security.krb5.conf={krb5_conf}",
                            "--class", "TokensJob", str(app_jar), str(EXECUTORS))
    if getattr(stoker, "master", None):  # another master than spark+stoker://<address>
        command[command.index("--master") + 1] = stoker.master
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=work_dir)
    assert out.returncode == 0, f"spark-submit failed ({out.returncode}):\n{out.stderr[-6000:]}"
    result = json.loads(next(l for l in out.stdout.splitlines() if l.startswith('{"event": "result"')))
    # The driver ran with Hadoop security on and held the token itself.
    assert result["security_enabled"] is True, result
    assert f"{TOKEN_KIND} {service}" in result["driver_tokens"], result
    return result, service


def check_every_executor_has_the_token(result, service, executor_ids):
    """Every executor of the application (`executor_ids`, as stoker started them) ran tasks, and
    its tasks ran as a Hadoop user holding the driver's token; none had been given a token file."""
    executors = result["executors"]
    assert sorted(executors) == sorted(executor_ids), (sorted(executors), sorted(executor_ids))
    assert len(executors) == EXECUTORS, executors
    for executor_id, seen in executors.items():
        assert seen["token_file_env"] is None, (executor_id, seen)
        tokens = [t for t in seen["tokens"] if t.startswith(TOKEN_KIND + " ")]
        assert tokens == [f"{TOKEN_KIND} {service}"], (
            f"executor {executor_id} lacks the driver's delegation token {TOKEN_KIND} {service}: "
            f"it has {seen['tokens']}")


def test_executors_get_the_drivers_delegation_tokens(stoker, work_dir):
    result, service = submit_with_a_token(stoker, work_dir)
    modes.registered(stoker, 1)
    app_id = result["app_id"]
    logs = sorted((work_dir / app_id).glob("executor-*.log"))
    ids = [p.stem.removeprefix("executor-") for p in logs]
    check_every_executor_has_the_token(result, service, ids)
    # Each executor took them from its SparkAppConfig as it started.
    for log in logs:
        assert EXECUTOR_ADDS_TOKENS in log.read_text(errors="replace"), log


class OnPods:
    """The `kube` stoker as test_start_modes' command() uses a stoker: its address and the driver
    settings of an application on the test bed."""

    def __init__(self, kube):
        self.address = kube.address
        self.kube = kube

    def driver_args(self):
        return [*self.kube.driver_confs(), *k8s_args("default")]


@pytest.fixture
def driver_tokens(testbed, tmp_path):
    """What test_kubernetes' autouse _driver_tokens fixture does (k8s_args' ServiceAccount
    tokens), for the test bed test only: imported here, that fixture would start the test bed
    for the local-backend test too."""
    test_kubernetes._TESTBED = testbed
    test_kubernetes._TOKENS.clear()
    test_kubernetes._TOKENS["dir"] = tmp_path
    yield
    test_kubernetes._TOKENS.clear()


class SparksOwnBackend:
    """Spark's own Kubernetes backend on the test bed, for submit_with_a_token (its client finds
    the API server through KUBECONFIG)."""

    def __init__(self, testbed):
        self.address = None
        self.master = f"k8s://https://127.0.0.1:{testbed.port}"

    def driver_args(self):
        return k8s_args("default", token=False)


@pytest.mark.long
def test_executor_pods_get_the_drivers_delegation_tokens_as_under_sparks_own_backend(
        driver_tokens, kube, testbed, work_dir, monkeypatch):
    """The same job under Spark's own Kubernetes backend, then under stoker's Kubernetes backend:
    under both, every executor pod has the driver's token."""
    monkeypatch.setenv("KUBECONFIG", testbed.env["KUBECONFIG"])  # Spark's own backend's client
    for name, master in (("spark", SparksOwnBackend(testbed)), ("stoker", OnPods(kube))):
        (work_dir / name).mkdir()
        watch = testbed.api.watch("/api/v1/pods", labelSelector="spark-role=executor")
        try:
            result, service = submit_with_a_token(master, work_dir / name)
            added = [o for t, o in watch.objects() if t == "ADDED"]
        finally:
            watch.close()
        # The application's executors, by their pods' spark-exec-id labels.
        ids = [o["metadata"]["labels"]["spark-exec-id"] for o in added
               if o["metadata"]["labels"].get("spark-app-selector") == result["app_id"]]
        check_every_executor_has_the_token(result, service, ids)
        managers = {o["metadata"]["labels"].get("app.kubernetes.io/managed-by") for o in added
                    if o["metadata"]["labels"].get("spark-app-selector") == result["app_id"]}
        assert managers == ({"stoker"} if name == "stoker" else {None}), (name, managers)
        # Either backend deletes its executor pods as the application stops.
        selector = f"spark-app-selector={result['app_id']}"
        wait_until(lambda: not testbed.api.pods("default", labelSelector=selector), 60,
                   f"{name}: the application's executor pods gone")
