"""The ways users start Spark, on the Kubernetes test bed: the JVM tools (spark-submit with an
application jar, spark-shell, the spark-sql CLI) and a Spark Connect server with dynamic
allocation serving a thin Python client, each with `--master spark+stoker://…` and stoker's
Kubernetes backend: the answer is right and the executors were pods stoker created for that
application. (PySpark scripts run through the Kubernetes backend in every other test here.)
A second, slower case of kinds `make test` runs on the local backend (tests/e2e/test_start_modes.py):
marked `long`."""
import re

import pytest

from conftest import wait_until
from test_kubernetes import (  # noqa: F401  (fixtures: the autouse token one, kube)
    _driver_tokens,
    k8s_args,
    kube,
    pods_of,
    selector,
)
import test_start_modes as modes  # a module, not its tests: they would be collected here again

pytestmark = pytest.mark.long


class OnPods:
    """The `kube` stoker as start_modes' helpers use a stoker: its address and log, and the
    driver settings of an application on the test bed."""

    def __init__(self, kube):
        self.kube = kube
        self.address = kube.address
        self.log_path = kube.log_path

    def driver_args(self):
        return [*self.kube.driver_confs(), *k8s_args("default")]

    def apps(self):
        return re.findall(r"application registered app=(\S+)", self.log_path.read_text())


@pytest.fixture
def on_pods(kube, testbed):
    """`kube` for start_modes' helpers; after the test, every application it registered had
    executor pods of its own (checked on a watch of the instance's pods)."""
    watch = testbed.api.watch("/api/v1/pods", labelSelector=selector(kube.instance))
    stoker = OnPods(kube)
    try:
        yield stoker
        apps = stoker.apps()
        assert apps, "no application registered with stoker"
        added = [o for t, o in watch.objects() if t == "ADDED"]
        for app_id in apps:
            pods = [o for o in added if o["metadata"]["labels"].get("spark-app-selector") == app_id]
            assert len(pods) >= 2, (app_id, [o["metadata"]["name"] for o in added])
    finally:
        watch.close()


def test_spark_submit_with_an_application_jar_on_pods(on_pods, work_dir):
    modes.test_spark_submit_with_an_application_jar(on_pods, work_dir)


def test_spark_shell_runs_a_scala_script_on_pods(on_pods, work_dir):
    modes.test_spark_shell_runs_a_scala_script(on_pods, work_dir)


def test_spark_sql_cli_on_pods(on_pods, work_dir):
    modes.test_spark_sql_cli(on_pods, work_dir)


def test_spark_connect_server_with_dynamic_allocation_on_pods(on_pods, kube, testbed, work_dir):
    """A Connect server with dynamic allocation from zero: a client's query brings executor pods,
    the idle server gives them all back while it keeps serving, and the next client's query
    brings new pods."""
    watch = testbed.api.watch("/api/v1/pods", labelSelector=selector(kube.instance))
    added = lambda: {o["metadata"]["name"] for t, o in watch.objects() if t == "ADDED"}
    try:
        with modes.connect_server(on_pods, work_dir, *modes.DYNAMIC_FROM_ZERO) as remote:
            wait_until(lambda: on_pods.apps(), 60, "the server's application to register")
            assert not added(), "executor pods before any query"
            first = modes.connect_query(on_pods, remote, work_dir)
            app_id = first["app_id"]
            wait_until(lambda: added() and not pods_of(testbed, kube.instance, app_id), 90,
                       "the idle server's executor pods to be released")
            before = added()
            second = modes.connect_query(on_pods, remote, work_dir)
            assert second["app_id"] == app_id
            assert added() - before, f"no new executor pod for the second query: {sorted(before)}"
    finally:
        watch.close()
    assert (first["groups"], first["count"], first["sum"]) == (1000, modes.ROWS, modes.SUM)
