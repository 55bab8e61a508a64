"""End-to-end: real Spark drivers get their executors as pods from stoker's Kubernetes backend,
on the test bed (a real API server, scheduler, controller manager; the process kubelet runs the
apache/spark executor role as local JVMs)."""
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import (DECOMMISSIONING, JAR, JOBS, PROCESS_NODE, STOKER, Driver, Stoker, wait_tasks_running,
                      wait_until)
from test_tls import SERVER_EXT, issue, make_ca
from testbed import FAULT, ROOT, ApiError, terminated

IMAGE = "apache/spark:4.2.0"
_instances = itertools.count(1)


class KubeStoker(Stoker):
    """stoker with --backend kubernetes against the test bed."""

    def __init__(self, work_dir, testbed, instance, lease_ttl="6s", kubeconfig=None, extra=(), tls=False):
        super().__init__(work_dir, lease_ttl)
        self.testbed = testbed
        self.instance = instance
        self.kubeconfig = kubeconfig
        self.extra = list(extra)
        self.tls = tls

    def _tls_args(self):
        """With `tls`: a certificate for 127.0.0.1 signed by a CA of this test, made once."""
        if not self.tls:
            return []
        certs = self.work_dir / "stoker-certs"
        if not certs.exists():
            certs.mkdir()
            self.tls_ca = make_ca(certs, "stoker-ca")
            issue(certs, "stoker-ca", "stoker", SERVER_EXT)
        self.tls_ca = certs / "stoker-ca.pem"
        return ["--tls-cert", str(certs / "stoker.pem"), "--tls-key", str(certs / "stoker.key")]

    def start(self):
        assert STOKER.exists(), f"{STOKER} missing: run scripts/setup.sh"
        env = self.testbed.client_env()
        if self.kubeconfig:
            env["KUBECONFIG"] = str(self.kubeconfig)
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [
                str(STOKER), "serve", "--backend", "kubernetes",
                "--listen", f"127.0.0.1:{self.port}",
                "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
                "--work-dir", str(self.work_dir),
                "--lease-ttl", self.lease_ttl,
                "--delete-grace", "3s",
                "--kube-image", IMAGE,
                "--kube-instance", self.instance,
                *self._tls_args(),
                *self.extra,
            ],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )
        wait_until(self._listening, 60, "stoker to listen")
        return self

    def restart_on_same_port(self):
        """A new stoker process with the same address, instance and work dir."""
        self.start()
        return self


def pod_logs(kubelet, pods):
    """The container logs the process kubelet writes for `pods`."""
    return lambda: [f for p in pods for f in kubelet.pod_dir(p).glob("*.log")]


def selector(instance, app_id=None):
    sel = f"app.kubernetes.io/managed-by=stoker,stoker.dev/instance={instance}"
    if app_id:
        sel += f",spark-app-selector={app_id}"
    return sel


def pods_of(testbed, instance, app_id=None):
    return testbed.api.get("/api/v1/pods", labelSelector=selector(instance, app_id))["items"]


def running_pods(testbed, instance, app_id=None):
    return [p for p in pods_of(testbed, instance, app_id)
            if (p.get("status") or {}).get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp")]


def check_result(result, rows=1_000_000):
    assert result["results"], result
    for r in result["results"]:
        assert r["groups"] == 1000
        assert r["count"] == rows
        assert r["sum"] == rows * (rows - 1) // 2


# Drivers authenticate to stoker (its default --auth kubernetes on the Kubernetes backend) with a
# real token of their own ServiceAccount, as under Spark's own backend: a ServiceAccount "spark"
# in the application's namespace, bound to the "edit" ClusterRole there (pods, PVCs, ConfigMaps),
# and a token the API server issued for the audience "stoker".
_TESTBED = None
_TOKENS = {}


@pytest.fixture(autouse=True)
def _driver_tokens(testbed, tmp_path):
    global _TESTBED
    _TESTBED = testbed
    _TOKENS.clear()
    _TOKENS["dir"] = tmp_path
    yield
    _TOKENS.clear()


def driver_service_account(namespace, sa="spark", edit=True):
    """Creates ServiceAccount `sa` in `namespace` (bound to "edit" there when `edit`)."""
    api = _TESTBED.api
    for path, body in [
        (f"/api/v1/namespaces/{namespace}/serviceaccounts",
         {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa}}),
        *([(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": f"{sa}-edit"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
             "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}]})] if edit else []),
    ]:
        try:
            api.create(path, body)
        except ApiError as e:
            if e.code != 409:
                raise


def driver_token(namespace="default", sa="spark", edit=True, audience="stoker"):
    """A file holding a token of `sa` in `namespace` for `audience`."""
    key = (namespace, sa, edit, audience)
    if key not in _TOKENS:
        driver_service_account(namespace, sa, edit)
        token = _TESTBED.kubectl("create", "token", sa, "-n", namespace, "--audience", audience,
                                 "--duration", "2h").stdout.strip()
        path = _TOKENS["dir"] / f"token-{namespace}-{sa}-{len(_TOKENS)}"
        path.write_text(token)
        _TOKENS[key] = path
    return _TOKENS[key]


def k8s_args(namespace="default", *more, token=True):
    auth = ["--conf", f"spark.stoker.auth.tokenFile={driver_token(namespace)}"] if token else []
    return ["--conf", f"spark.kubernetes.namespace={namespace}",
            "--conf", f"spark.kubernetes.container.image={IMAGE}",
            "--conf", f"spark.executorEnv.PYSPARK_PYTHON={sys.executable}", *auth, *more]


def conf_args(confs):
    return [a for k, v in confs.items() for a in ("--conf", f"{k}={v}")]


@pytest.fixture
def kube(testbed, process_kubelet, work_dir, monkeypatch):
    """A Kubernetes-backed stoker with its own instance label, as deployed: drivers authenticate
    with their ServiceAccount tokens (k8s_args) over TLS (the driver_factory passes the CA).
    After the test no pod of it may be left."""
    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    instance = f"e2e-{os.getpid()}-{next(_instances)}"
    server = KubeStoker(work_dir, testbed, instance, tls=True)
    server.start()
    yield server
    server.stop()
    left = lambda: [p["metadata"]["name"] for p in pods_of(testbed, instance)]
    # Executors of a finished driver are deleted; a stoker killed in a test has its pods
    # removed by the lease (re-started stoker) or garbage collection. Clean up anyway, then fail.
    try:
        wait_until(lambda: not left(), 60, "no executor pods left")
    except AssertionError:
        names = left()
        for p in pods_of(testbed, instance):
            testbed.api.delete_pod(p["metadata"]["name"], p["metadata"]["namespace"], force=True)
        raise AssertionError(f"executor pods leaked: {names}")


@pytest.fixture
def namespaces(testbed):
    made = []

    def make(name):
        testbed.api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                    "metadata": {"name": name}})
        made.append(name)
        # The service account controller creates "default"; pods need it.
        wait_until(lambda: testbed.api.get_opt(f"/api/v1/namespaces/{name}/serviceaccounts/default"),
                   30, f"service account default in {name}")
        return name

    yield make
    for n in made:
        testbed.api.delete(f"/api/v1/namespaces/{n}")


def test_shuffle_job_on_executor_pods(kube, testbed, process_kubelet, driver_factory):
    watch = testbed.api.watch("/api/v1/pods", labelSelector=selector(kube.instance))
    driver = driver_factory(kube, "--executors", "2", *k8s_args())
    started = driver.wait_event("started", timeout=180)
    result = driver.wait(timeout=300)
    check_result(result)
    app_id = started["app_id"]
    created = {o["metadata"]["name"]: o for t, o in watch.objects() if t == "ADDED"}
    watch.close()
    assert len(created) == 2, sorted(created)
    for name, pod in created.items():
        labels = pod["metadata"]["labels"]
        assert labels["spark-role"] == "executor"
        assert labels["spark-app-selector"] == app_id
        assert labels["spark-exec-id"] in ("1", "2")
        c = pod["spec"]["containers"][0]
        assert c["image"] == IMAGE and c["args"] == ["executor"]
        assert c["resources"]["limits"]["memory"] == c["resources"]["requests"]["memory"] == "896Mi"
        # The kubelet ran Spark's Kubernetes executor backend for it.
        logs = list(process_kubelet.pod_dir(pod).glob("*.log"))
        text = "".join(p.read_text(errors="replace") for p in logs)
        assert "KubernetesExecutorBackend: Started daemon" in text, text[-2000:]
    # Unregistering removed every pod.
    wait_until(lambda: not pods_of(testbed, kube.instance), 60, "pods deleted after the job")


def test_oom_and_external_deletion_are_reported_and_replaced(kube, testbed, process_kubelet, driver_factory):
    watch = testbed.api.watch("/api/v1/pods", labelSelector=selector(kube.instance))
    driver = driver_factory(kube, "--executors", "2", "--slow-ms", "1500", "--partitions", "30",
                            *k8s_args())
    driver.wait_event("job-start", timeout=180)
    app_id = driver.event("started")["app_id"]
    pods = wait_until(lambda: (lambda r: r if len(r) >= 2 else None)(running_pods(testbed, kube.instance, app_id)),
                      120, "two running executor pods")
    wait_tasks_running(pod_logs(process_kubelet, pods), 2)
    by_id = {p["metadata"]["labels"]["spark-exec-id"]: p["metadata"]["name"] for p in pods}
    # The kubelet OOM-kills executor 1, and someone deletes executor 2's pod.
    testbed.api.annotate_pod(by_id["1"], FAULT, "oom")
    log_has = lambda pattern: re.search(pattern, driver.log())
    wait_until(lambda: log_has(r"stoker: executor 1 exited with code 137 \(OOM_KILLED\)"), 60,
               "the driver to hear of the OOM kill")
    testbed.api.delete_pod(by_id["2"], grace=1)
    wait_until(lambda: log_has(r"stoker: executor 2 exited.*\(DELETED_EXTERNALLY\)"), 60,
               "the driver to hear of the deleted pod")
    result = driver.wait(timeout=400)
    check_result(result)
    added = {o["metadata"]["labels"]["spark-exec-id"]: o for t, o in watch.objects() if t == "ADDED"}
    watch.close()
    # Both were replaced by new executors (ids are never reused).
    assert {"1", "2", "3", "4"} <= set(added), sorted(added)
    # The OOM kill grew the profile: executors created after it get a bigger memory limit (more
    # overhead, same heap), and the driver was told.
    def memory(pod):
        container = next(c for c in pod["spec"]["containers"]
                         if c["name"] == pod["metadata"]["annotations"]["stoker.dev/executor-container"])
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        return int(container["resources"]["limits"]["memory"].removesuffix("Mi")), env["SPARK_EXECUTOR_MEMORY"]
    first_limit, first_heap = memory(added["1"])
    grown = [memory(o) for i, o in added.items() if int(i) >= 3]
    assert grown and all(limit > first_limit and heap == first_heap for limit, heap in grown), \
        (first_limit, first_heap, grown)
    assert re.search(r"stoker: profile 0 now starts executors with .* after executor 1 was OOM-killed", driver.log())


def kubeconfig_for(testbed, path, token):
    """A kubeconfig at `path` that reaches the test bed with `token` (a ServiceAccount's)."""
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "testbed", "cluster": {
            "server": f"https://127.0.0.1:{testbed.port}",
            "certificate-authority": testbed.env["CA_CERT"]}}],
        "users": [{"name": "stoker", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "testbed", "user": "stoker"}}],
    }))
    return path


def executor_memory(pod):
    """(memory limit in MiB, SPARK_EXECUTOR_MEMORY) of an executor pod's executor container."""
    container = next(c for c in pod["spec"]["containers"]
                     if c["name"] == pod["metadata"]["annotations"]["stoker.dev/executor-container"])
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    return int(container["resources"]["limits"]["memory"].removesuffix("Mi")), env["SPARK_EXECUTOR_MEMORY"]


def sizes_document(testbed, path):
    """The sizes.tsv a sizes ConfigMap holds ("" when none)."""
    cm = testbed.api.get_opt(path)
    return ((cm or {}).get("data") or {}).get("sizes.tsv", "")


def test_the_next_run_of_a_sizing_key_starts_at_the_grown_size_after_a_stoker_restart(
        kube, testbed, driver_factory):
    """Memory across runs on Kubernetes: run 1 is OOM-killed once and grows; the leader writes
    the size it ended with to the sizes ConfigMap; a new stoker process (nothing in memory)
    reads it at start, and run 2 of the same spark.stoker.sizing.key starts its first executor
    pod at the grown size, with no OOM kill."""
    name = f"sizes-{kube.instance}"
    path = f"/api/v1/namespaces/default/configmaps/{name}"
    key = f"oom-{kube.instance}"
    kube.stop()
    kube.extra = ["--sizes-configmap", f"default/{name}"]
    kube.start()
    sizing = ("--conf", f"spark.stoker.sizing.key={key}")
    try:
        watch = testbed.api.watch("/api/v1/pods", labelSelector=selector(kube.instance))
        first = driver_factory(kube, "--executors", "1", "--slow-ms", "500", "--partitions", "20",
                               *k8s_args("default", *sizing))
        first.wait_event("job-start", timeout=180)
        app_id = first.event("started")["app_id"]
        pod = wait_until(lambda: next(iter(running_pods(testbed, kube.instance, app_id)), None),
                         120, "a running executor pod")
        assert pod["metadata"]["labels"]["spark-exec-id"] == "1", pod["metadata"]["labels"]
        testbed.api.annotate_pod(pod["metadata"]["name"], FAULT, "oom")
        grown = wait_until(lambda: re.search(
            r"stoker: profile 0 now starts executors with (\d+) MiB heap \+ (\d+) MiB overhead "
            r"after executor 1 was OOM-killed", first.log()), 90, "the driver to hear of the growth")
        check_result(first.wait(timeout=400))
        added = {o["metadata"]["labels"]["spark-exec-id"]: o for t, o in watch.objects() if t == "ADDED"}
        watch.close()
        configured_limit, heap = executor_memory(added["1"])
        grown_limit, grown_heap = executor_memory(added["2"])
        assert grown_limit > configured_limit and grown_heap == heap, (configured_limit, grown_limit)
        assert grown_limit == int(grown[1]) + int(grown[2]), (grown_limit, grown.groups())
        # The run ended (unregistered): the leader wrote its size to the ConfigMap.
        line = f"v2\t{key}\t0\t512\t384\t{grown[1]}\t{grown[2]}\t"
        wait_until(lambda: line in sizes_document(testbed, path), 30, "the grown size in the ConfigMap")
        wait_until(lambda: not pods_of(testbed, kube.instance), 60, "run 1's pods deleted")

        # A new stoker process: only the ConfigMap remembers.
        kube.stop()
        kube.start()
        assert "remembered executor sizes read" in kube.log_path.read_text()
        watch = testbed.api.watch("/api/v1/pods", labelSelector=selector(kube.instance))
        second = driver_factory(kube, "--executors", "1", "--partitions", "4", *k8s_args("default", *sizing))
        check_result(second.wait(timeout=300))
        added = {o["metadata"]["labels"]["spark-exec-id"]: o for t, o in watch.objects() if t == "ADDED"}
        watch.close()
        log = second.log()
        assert (f"profile 0 starts executors with {grown[1]} MiB heap + {grown[2]} MiB overhead, the size "
                f"an earlier run of spark.stoker.sizing.key \"{key}\" ended with") in log, log[-8000:]
        # Its first pod had the grown limit and the configured heap; nothing was OOM-killed.
        assert executor_memory(added["1"]) == (grown_limit, heap), (executor_memory(added["1"]), grown_limit)
        assert set(added) == {"1"}, sorted(added)
        assert "OOM_KILLED" not in log and "now starts executors" not in log, log[-8000:]
    finally:
        try:
            testbed.api.delete(path)
        except ApiError as e:
            if e.code != 404:
                raise


def test_a_heap_bound_out_of_memory_error_grows_the_heap_of_the_replacement_pod(kube, testbed, driver_factory):
    """Heap-bound, on real executor JVMs: each of two tasks builds a 600 MiB string in the heap
    with spark.executor.memory=512m. Executor 1 (-Xmx512m, from SPARK_EXECUTOR_MEMORY through the
    image's entrypoint) dies of java.lang.OutOfMemoryError: its container exits with code 52
    (not an OOM kill: the JVM stops before the pod reaches its limit). stoker grows the heap and
    the limit with it, the driver is told why, the replacement pod carries the bigger
    SPARK_EXECUTOR_MEMORY and limit, and the job's answer is right."""
    watch = testbed.api.watch("/api/v1/pods", labelSelector=selector(kube.instance))
    try:
        driver = driver_factory(kube, "--mib", "600", "--tasks", "2", *k8s_args(), job="heap_hog.py")
        result = driver.wait(timeout=400)
        events = watch.objects()
    finally:
        watch.close()
    assert result["lengths"] == [600 * 1024 * 1024] * 2, result
    log = driver.log()
    assert re.search(r"stoker: executor 1 exited with code 52", log), log[-8000:]
    resizes = re.findall(
        r"stoker: profile 0 now starts executors with (\d+) MiB heap \+ (\d+) MiB overhead "
        r"after executor (\d+) ran out of heap \(OutOfMemoryError, exit code 52\)", log)
    assert 1 <= len(resizes) <= 2 and resizes[0][2] == "1", log[-8000:]
    assert "OOM_KILLED" not in log, log[-8000:]
    added = {o["metadata"]["labels"]["spark-exec-id"]: o for t, o in events if t == "ADDED"}
    # What the kubelet reported for executor 1's container: the JVM's own exit code.
    codes = {((c.get("state") or {}).get("terminated") or {}).get("exitCode")
             for t, o in events if o["metadata"]["labels"]["spark-exec-id"] == "1"
             for c in (o.get("status") or {}).get("containerStatuses") or []}
    assert 52 in codes, codes
    first_limit, first_heap = executor_memory(added["1"])
    assert (first_limit, first_heap) == (896, "512m"), (first_limit, first_heap)
    later = {i: executor_memory(o) for i, o in added.items() if int(i) > 1}
    assert later, sorted(added)
    for limit, heap in later.values():
        assert limit > first_limit and int(heap.removesuffix("m")) > 512, later
    # The last replacement has exactly the size the driver was last told of.
    heap_mib, overhead_mib, _ = resizes[-1]
    last = later[max(later, key=int)]
    assert last == (int(heap_mib) + int(overhead_mib), f"{heap_mib}m"), (last, resizes)
    print(f"executor pods (limit MiB, SPARK_EXECUTOR_MEMORY): 1: {(first_limit, first_heap)}, later: {later}; "
          f"resizes: {resizes}")


PYTHON_HOG_MIB = 650


def test_a_container_oom_kill_from_python_memory_grows_the_overhead_of_the_replacement_pod(
        kube, testbed, driver_factory):
    """Memory outside the heap, on real executors: each of two tasks holds PYTHON_HOG_MIB MiB in
    its PySpark Python worker with spark.executor.memory=512m. The worker and the JVM together
    go over executor 1's 896 MiB limit and the kubelet OOM-kills the container for real (no
    injected fault): OOMKilled, exit code 137. stoker grows the overhead only (the heap was not
    what ran out), the driver is told why, the replacement pod has a bigger limit and the same
    SPARK_EXECUTOR_MEMORY, and the job's answer is right."""
    mib = PYTHON_HOG_MIB
    watch = testbed.api.watch("/api/v1/pods", labelSelector=selector(kube.instance))
    try:
        driver = driver_factory(kube, "--mib", str(mib), "--tasks", "2", *k8s_args(), job="python_hog.py")
        result = driver.wait(timeout=400)
        events = watch.objects()
    finally:
        watch.close()
    assert result["lengths"] == [mib << 20] * 2, result
    log = driver.log()
    assert re.search(r"stoker: executor 1 exited with code 137 \(OOM_KILLED\)", log), log[-8000:]
    resizes = re.findall(
        r"stoker: profile 0 now starts executors with (\d+) MiB heap \+ (\d+) MiB overhead "
        r"after executor (\d+) was OOM-killed", log)
    assert 1 <= len(resizes) <= 2 and resizes[0][2] == "1", log[-8000:]
    assert all(heap == "512" for heap, _, _ in resizes), resizes
    assert "ran out of heap" not in log, log[-8000:]
    # What the kubelet reported for executor 1's container: a real OOM kill.
    ended = [((c.get("state") or {}).get("terminated") or {})
             for t, o in events if o["metadata"]["labels"]["spark-exec-id"] == "1"
             for c in (o.get("status") or {}).get("containerStatuses") or []]
    assert {(t.get("reason"), t.get("exitCode")) for t in ended if t} == {("OOMKilled", 137)}, ended
    added = {o["metadata"]["labels"]["spark-exec-id"]: o for t, o in events if t == "ADDED"}
    assert executor_memory(added["1"]) == (896, "512m"), executor_memory(added["1"])
    later = {i: executor_memory(o) for i, o in added.items() if int(i) > 1}
    assert later, sorted(added)
    for limit, heap in later.values():
        assert limit > 896 and heap == "512m", later
    # The last replacement has exactly the size the driver was last told of.
    heap_mib, overhead_mib, _ = resizes[-1]
    assert later[max(later, key=int)] == (int(heap_mib) + int(overhead_mib), "512m"), (later, resizes)
    print(f"executor pods (limit MiB, SPARK_EXECUTOR_MEMORY): 1: {executor_memory(added['1'])}, "
          f"later: {later}; resizes: {resizes}")


def test_a_grown_size_the_namespace_limitrange_refuses_is_relayed_and_not_tried_again(
        kube, testbed, driver_factory, namespaces):
    """A LimitRange caps containers at 1 GiB: the configured 896 MiB executor fits, the 1344 MiB
    one an OOM kill grows to does not. The API server's refusal reaches the driver word for word,
    stoker steps the profile back to 896 MiB once (it cannot read LimitRanges with its own
    identity, so the refusal is how it learns the cap), creates the replacement at that size and
    does not ask for the refused size again; the job finishes."""
    ns = namespaces(f"sizes-lr-{os.getpid()}")
    testbed.api.create(f"/api/v1/namespaces/{ns}/limitranges", {
        "apiVersion": "v1", "kind": "LimitRange", "metadata": {"name": "max-1gi"},
        "spec": {"limits": [{"type": "Container", "max": {"memory": "1Gi"}}]}})
    watch = testbed.api.watch(f"/api/v1/namespaces/{ns}/pods", labelSelector=selector(kube.instance))
    driver = driver_factory(kube, "--executors", "1", "--slow-ms", "500", "--partitions", "20", *k8s_args(ns))
    driver.wait_event("job-start", timeout=180)
    app_id = driver.event("started")["app_id"]
    pod = wait_until(lambda: next(iter(running_pods(testbed, kube.instance, app_id)), None),
                     120, "a running executor pod")
    testbed.api.annotate_pod(pod["metadata"]["name"], FAULT, "oom", ns=ns)
    log_has = lambda pattern: re.search(pattern, driver.log())
    wait_until(lambda: log_has(r"now starts executors with 512 MiB heap \+ 832 MiB overhead after executor 1 "
                               r"was OOM-killed"), 90, "the growth to 1344 MiB")
    # The LimitRanger's own words, relayed with the exit of the executor that could not exist.
    refused = wait_until(lambda: log_has(
        r"stoker: executor 2 exited [^\n]*\(START_FAILED\)[^\n]*refused by the Kubernetes API server: "
        r"[^\n]*maximum memory usage per Container is 1Gi, but limit is 1344Mi"), 90, "the refusal")
    print(refused.group(0))
    wait_until(lambda: log_has(r"profile 0 goes back to 512 MiB heap \+ 384 MiB overhead and grows no further"),
               30, "the step back")
    check_result(driver.wait(timeout=400))
    added = {o["metadata"]["labels"]["spark-exec-id"]: o for t, o in watch.objects() if t == "ADDED"}
    watch.close()
    # Executor 2 never existed; 3 replaced it at the size the namespace allows; no other try.
    assert set(added) == {"1", "3"}, sorted(added)
    assert executor_memory(added["3"]) == executor_memory(added["1"]), \
        (executor_memory(added["1"]), executor_memory(added["3"]))
    assert executor_memory(added["3"])[0] == 896
    assert kube.log_path.read_text().count("pod creation failed") == 1


def test_dynamic_allocation_scales_pods_up_and_down(kube, testbed, driver_factory):
    """Dynamic allocation with decommissioning: Spark decommissions its idle executors (instead
    of killing them), stoker labels their pods with spark.kubernetes.executor.decommissionLabel
    as Spark's own backend does, and the pods go once the executors have left."""
    label = {"spark.kubernetes.executor.decommissionLabel": "stoker-e2e/draining",
             "spark.kubernetes.executor.decommissionLabelValue": "yes"}
    watch = testbed.api.watch("/api/v1/pods", labelSelector=selector(kube.instance))
    try:
        driver = driver_factory(
            kube, "--dynamic", "--executors", "3", "--slow-ms", "800", "--partitions", "30",
            "--jobs", "2", "--pause-s", "15", *k8s_args("default", *DECOMMISSIONING, *conf_args(label)),
        )
        driver.wait_event("job-start", timeout=180)
        app_id = driver.event("started")["app_id"]
        wait_until(lambda: len(running_pods(testbed, kube.instance, app_id)) >= 2, 150,
                   "scale-up to at least 2 executor pods")
        driver.wait_event("idle", timeout=300)
        first_job = {o["metadata"]["name"] for t, o in watch.objects() if t == "ADDED"}
        wait_until(lambda: not pods_of(testbed, kube.instance, app_id), 60, "scale-down to 0 pods when idle")
        # The first job's executors that left by decommissioning (their JVM ends by itself, code
        # 0, where a killed one ends with 143) carried the label before their pods went.
        decommissioned = {}
        for name in first_job:
            _, gone = watch.wait_for(lambda t, o: t == "DELETED" and o["metadata"]["name"] == name, 30,
                                     f"the watch to see {name} deleted")
            if terminated(gone) and terminated(gone).get("exitCode") == 0:
                decommissioned[name] = any((o["metadata"].get("labels") or {}).get("stoker-e2e/draining") == "yes"
                                           for _, o in watch.objects(name))
        assert len(decommissioned) >= 2 and all(decommissioned.values()), decommissioned
        check_result(driver.wait(timeout=400))
    finally:
        watch.close()


def test_driver_sigkill_deletes_its_pods_within_the_lease(kube, testbed, driver_factory):
    driver = driver_factory(kube, "--executors", "2", "--jobs", "2", "--pause-s", "120", *k8s_args())
    started = driver.wait_event("started", timeout=120)
    driver.wait_event("idle", timeout=300)
    app_id = started["app_id"]
    assert len(running_pods(testbed, kube.instance, app_id)) == 2
    driver.kill9()
    killed_at = time.monotonic()
    # Lease 6 s, delete grace 3 s; the kubelet stops the JVMs and the objects go.
    wait_until(lambda: not pods_of(testbed, kube.instance, app_id), 6 + 20, "pods deleted after the lease")
    assert time.monotonic() - killed_at < 6 + 20


@pytest.mark.long  # make test: the leader-election and claims tests SIGKILL stoker mid-job too
def test_stoker_restart_mid_job_adopts_pods_without_duplicates(kube, testbed, process_kubelet, driver_factory):
    watch = testbed.api.watch("/api/v1/pods", labelSelector=selector(kube.instance))
    driver = driver_factory(kube, "--executors", "2", "--slow-ms", "1500", "--partitions", "24",
                            *k8s_args())
    driver.wait_event("job-start", timeout=180)
    app_id = driver.event("started")["app_id"]
    pods = wait_until(lambda: (lambda r: r if len(r) == 2 else None)(running_pods(testbed, kube.instance, app_id)),
                      120, "two running pods")
    wait_tasks_running(pod_logs(process_kubelet, pods), 2)
    kube.kill9()
    kube.restart_on_same_port()
    wait_until(lambda: "driver re-registered" in kube.log_path.read_text(), 60, "the driver to re-register")
    result = driver.wait(timeout=400)
    check_result(result)
    created = sorted({o["metadata"]["name"] for t, o in watch.objects() if t == "ADDED"})
    watch.close()
    # The new stoker adopted the two pods: nothing was created twice.
    assert len(created) == 2, created
    assert "adopted executors from an earlier stoker" in kube.log_path.read_text()


@pytest.mark.long
def test_two_applications_in_two_namespaces_stay_apart(kube, testbed, driver_factory, namespaces):
    a, b = namespaces("team-a"), namespaces("team-b")
    watch = testbed.api.watch("/api/v1/pods", labelSelector=selector(kube.instance))
    da = driver_factory(kube, "--executors", "1", "--jobs", "2", "--pause-s", "60", *k8s_args(a))
    db = driver_factory(kube, "--executors", "1", "--jobs", "2", "--pause-s", "20", *k8s_args(b))
    app_a = da.wait_event("started", timeout=180)["app_id"]
    app_b = db.wait_event("started", timeout=180)["app_id"]
    da.wait_event("idle", timeout=300)
    db.wait_event("idle", timeout=300)
    assert running_pods(testbed, kube.instance, app_a) and running_pods(testbed, kube.instance, app_b)
    # Driver A dies: only A's pods go; B keeps its executor and finishes with the right answer.
    b_before = {p["metadata"]["name"] for p in running_pods(testbed, kube.instance, app_b)}
    da.kill9()
    wait_until(lambda: not pods_of(testbed, kube.instance, app_a), 30, "app A's pods deleted")
    assert {p["metadata"]["name"] for p in running_pods(testbed, kube.instance, app_b)} == b_before
    check_result(db.wait(timeout=400))
    created = [o for t, o in watch.objects() if t == "ADDED"]
    watch.close()
    placed = {(o["metadata"]["labels"]["spark-app-selector"], o["metadata"]["namespace"]) for o in created}
    assert placed == {(app_a, a), (app_b, b)}, placed


def in_cluster_driver_pod(name, command, node):
    """A driver pod on the test bed, as deploy/examples/driver-pod.yaml: the driver's own
    ServiceAccount "spark" (created here), a projected token for the audience "stoker" that the
    kubelet mounts (and the plugin re-reads when rotated), `command` (a job of tests/e2e/jobs and
    its arguments) with the Kubernetes settings and that token appended."""
    driver_service_account("default")
    command = [*command, *k8s_args("default", token=False),
               "--conf", "spark.stoker.auth.tokenFile=/var/run/secrets/stoker/token",
               "--conf", f"spark.kubernetes.driver.pod.name={name}"]
    env = [{"name": "STOKER_PLUGIN_JAR", "value": str(JAR)},
           {"name": "PYSPARK_PYTHON", "value": sys.executable},
           {"name": "PYSPARK_DRIVER_PYTHON", "value": sys.executable},
           {"name": "SPARK_LOCAL_IP", "value": "127.0.0.1"}]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"spark-role": "driver"}},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 2,
                 "serviceAccountName": "spark",
                 "nodeSelector": {"kubernetes.io/hostname": node},
                 "containers": [{"name": "driver", "image": "python:3.11", "command": command,
                                 "env": env, "resources": {"limits": {"memory": "3Gi"}},
                                 "volumeMounts": [{"name": "stoker-token",
                                                   "mountPath": "/var/run/secrets/stoker"}]}],
                 "volumes": [{"name": "stoker-token", "projected": {"sources": [
                     {"serviceAccountToken": {"audience": "stoker", "path": "token",
                                              "expirationSeconds": 3600}}]}}]},
    }


def test_driver_pod_deletion_garbage_collects_executors(kube, testbed, process_kubelet, work_dir):
    """A driver running in the cluster: its executors carry an owner reference, so even with
    stoker gone, deleting the driver pod removes them (the garbage collector does)."""
    name = "driver-gc"
    command = [sys.executable, str(JOBS / "shuffle.py"), kube.address, *kube.driver_confs(), "--executors", "2",
               "--jobs", "2", "--pause-s", "300"]
    created = testbed.api.create_pod(in_cluster_driver_pod(name, command, process_kubelet.node))
    uid = created["metadata"]["uid"]
    execs = wait_until(lambda: (lambda r: r if len(r) == 2 else None)(running_pods(testbed, kube.instance)),
                       180, "the driver pod's two executor pods")
    for p in execs:
        owners = p["metadata"].get("ownerReferences") or []
        assert [(o["kind"], o["name"], o["uid"]) for o in owners] == [("Pod", name, uid)], owners
    # The executor ConfigMap of the Spark-built pods is the driver pod's too.
    config_maps = lambda: testbed.api.get("/api/v1/namespaces/default/configmaps",
                                          labelSelector=f"stoker.dev/instance={kube.instance}")["items"]
    [cm] = config_maps()
    owners = cm["metadata"].get("ownerReferences") or []
    assert [(o["kind"], o["name"], o["uid"]) for o in owners] == [("Pod", name, uid)], owners
    kube.kill9()  # nobody left to delete them but the garbage collector
    testbed.api.delete_pod(name, grace=0)
    wait_until(lambda: not pods_of(testbed, kube.instance), 60, "executor pods garbage-collected")
    wait_until(lambda: not config_maps(), 60, "the executor ConfigMap garbage-collected")
    testbed.api.wait_pod_gone(name, 60)


def test_deploy_manifests_rbac_is_enough_and_no_more(testbed, process_kubelet, work_dir, driver_factory,
                                                     monkeypatch):
    """Applies deploy/base to the test bed and runs stoker with the ServiceAccount's own token:
    a permission missing from the manifests fails this test, and so does one stoker could use to
    act beyond a driver (it writes nothing as itself: pods, claims and ConfigMaps are written by
    impersonating the driver, in namespaces that opted in)."""
    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    rendered = testbed.kubectl("kustomize", str(ROOT / "deploy" / "base")).stdout
    # The stoker image is not runnable on the process kubelet: keep the Deployment at 0 and run
    # the binary here with the same identity instead.
    rendered = rendered.replace("replicas: 2", "replicas: 0")
    assert "replicas: 0" in rendered
    testbed.kubectl("apply", "-f", "-", input=rendered)
    opt_in = (ROOT / "deploy" / "examples" / "allow-stoker-in-namespace.yaml").read_text()
    try:
        sa = "system:serviceaccount:stoker:stoker"
        can = lambda *a: testbed.kubectl("auth", "can-i", *a, f"--as={sa}", check=False).stdout.strip()
        for verb in ("list", "watch", "get"):
            assert can(verb, "pods", "-n", "default") == "yes", verb
        for args in (("create", "tokenreviews"), ("create", "subjectaccessreviews"), ("list", "namespaces")):
            assert can(*args) == "yes", args
        # Leader election: the Lease and its own pod's label, in stoker's namespace only.
        for args in (("get", "leases", "-n", "stoker"), ("create", "leases", "-n", "stoker"),
                     ("update", "leases", "-n", "stoker"), ("patch", "pods", "-n", "stoker")):
            assert can(*args) == "yes", args
        # Its own state: the sizes ConfigMap, that one name only; no create (it is shipped).
        for args in (("get", "configmaps/stoker-sizes", "-n", "stoker"),
                     ("update", "configmaps/stoker-sizes", "-n", "stoker")):
            assert can(*args) == "yes", args
        for args in (("create", "configmaps", "-n", "stoker"), ("get", "configmaps", "-n", "stoker"),
                     ("list", "configmaps", "-n", "stoker"), ("get", "configmaps/stoker-queues", "-n", "stoker"),
                     ("update", "configmaps/other", "-n", "stoker"),
                     ("patch", "configmaps/stoker-sizes", "-n", "stoker"),
                     ("delete", "configmaps/stoker-sizes", "-n", "stoker"),
                     ("get", "configmaps/stoker-sizes", "-n", "default")):
            assert can(*args) == "no", args
        # Nothing written as itself, and no impersonation until a namespace opts in.
        for args in (("create", "pods", "-n", "default"), ("delete", "pods", "-n", "default"),
                     ("create", "persistentvolumeclaims", "-n", "default"),
                     ("create", "configmaps", "-n", "default"),
                     ("impersonate", "serviceaccounts", "-n", "default"),
                     ("get", "secrets", "-n", "default"), ("delete", "nodes"), ("create", "deployments"),
                     ("patch", "namespaces"), ("get", "configmaps", "-n", "default"),
                     ("patch", "pods", "-n", "default"), ("create", "pods", "--subresource=exec"),
                     ("update", "leases", "-n", "default"), ("delete", "leases", "-n", "stoker")):
            assert can(*args) == "no", args
        testbed.kubectl("apply", "-n", "default", "-f", "-", input=opt_in)
        assert can("impersonate", "serviceaccounts", "-n", "default") == "yes"
        assert can("impersonate", "serviceaccounts", "-n", "kube-system") == "no"
        token = testbed.kubectl("create", "token", "stoker", "-n", "stoker", "--duration=1h").stdout.strip()
        kubeconfig = kubeconfig_for(testbed, work_dir / "stoker-sa.kubeconfig", token)
        instance = f"rbac-{os.getpid()}"
        # With leader election as deployed: the Lease in stoker's namespace, under the SA.
        server = KubeStoker(work_dir, testbed, instance, kubeconfig=kubeconfig,
                            extra=["--leader-elect", "--leader-elect-namespace", "stoker",
                                   "--leader-elect-identity", "rbac-test",
                                   # The namespace policy by label, with the ServiceAccount's
                                   # `list namespaces` (every namespace carries this label).
                                   "--allowed-namespace-selector", "kubernetes.io/metadata.name=default",
                                   # Its own state as deployed (POD_NAMESPACE's stoker-sizes).
                                   "--sizes-configmap", "stoker/stoker-sizes"]).start()
        assert "leader: lease acquired" in server.log_path.read_text()
        try:
            key = f"rbac-{instance}"
            driver = driver_factory(server, "--executors", "2",
                                    *k8s_args("default", "--conf", f"spark.stoker.sizing.key={key}"))
            check_result(driver.wait(timeout=300))
            wait_until(lambda: not pods_of(testbed, instance), 60, "pods deleted with the SA's rights")
            # The run's sizes were written to the shipped ConfigMap (get + update).
            sizes = "/api/v1/namespaces/stoker/configmaps/stoker-sizes"
            wait_until(lambda: f"\t{key}\t" in ((testbed.api.get(sizes).get("data") or {}).get("sizes.tsv", "")),
                       30, "the run's sizes in the ConfigMap")
        finally:
            server.stop()
        assert "Forbidden" not in server.log_path.read_text()
    finally:
        testbed.kubectl("delete", "-n", "default", "-f", "-", "--wait=false", input=opt_in, check=False)
        testbed.kubectl("delete", "-f", "-", "--wait=false", input=rendered, check=False)


def test_exceeded_quota_keeps_the_executor_requested_and_tells_the_driver(kube, testbed, driver_factory,
                                                                          namespaces):
    ns = namespaces("quota")
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "pods"},
             "spec": {"hard": {"pods": "1"}}}
    testbed.api.create(f"/api/v1/namespaces/{ns}/resourcequotas", quota)
    wait_until(lambda: (testbed.api.get(f"/api/v1/namespaces/{ns}/resourcequotas/pods").get("status") or {})
               .get("hard"), 30, "the quota to be in force")
    refused = lambda: testbed.api.metric("apiserver_request_total", resource="pods", verb="POST", code="403")
    refused_before = refused()
    driver = driver_factory(kube, "--executors", "2", *k8s_args(ns))
    # The driver hears why its second executor is late (while it waits for its executors).
    wait_until(lambda: re.search(r"stoker: executor \d+ is waiting: .*exceeded quota", driver.log()), 150,
               "the driver to be told about the quota")
    pods = testbed.api.pods(ns)
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    # stoker keeps trying (the API server counts its refused creations), with backoff, and says
    # so once, not once per attempt.
    wait_until(lambda: refused() >= refused_before + 3, 60, "three refused pod creations")
    assert kube.log_path.read_text().count("resource quota exceeded") == 1
    # Quota raised: the executor that stayed requested is created, and the job runs on both.
    testbed.api.merge_patch(f"/api/v1/namespaces/{ns}/resourcequotas/pods", {"spec": {"hard": {"pods": "4"}}})
    result = driver.wait(timeout=300)
    check_result(result)
    assert result["results"][0]["executors_alive"] == 2
    assert "exited" not in " ".join(re.findall(r"stoker: executor \d+ exited[^\n]*", driver.log()))


def test_unschedulable_executor_tells_the_driver_and_stays_requested(kube, testbed, driver_factory, namespaces):
    """No node matches the executor's node selector: the driver hears the scheduler's reason
    (once), the executor stays requested, and it runs as soon as a node matches."""
    ns = namespaces("unsched")
    label = "stoker.dev/e2e-pool"
    node = f"/api/v1/nodes/{PROCESS_NODE}"
    driver = driver_factory(kube, "--executors", "1",
                            *k8s_args(ns, "--conf", f"spark.kubernetes.node.selector.{label}=unsched"))
    try:
        wait_until(lambda: re.search(r"stoker: executor \d+ is waiting: pod \S+ cannot be scheduled: .*node",
                                     driver.log()), 150, "the driver to be told the pod cannot be scheduled")
        pods = testbed.api.pods(ns)
        assert len(pods) == 1 and pods[0]["status"].get("phase") == "Pending", pods
        assert kube.log_path.read_text().count("executor pod cannot be scheduled") == 1
        testbed.api.merge_patch(node, {"metadata": {"labels": {label: "unsched"}}})
        result = driver.wait(timeout=300)
        check_result(result)
        assert "exited" not in " ".join(re.findall(r"stoker: executor \d+ exited[^\n]*", driver.log()))
    finally:
        testbed.api.merge_patch(node, {"metadata": {"labels": {label: None}}})


def test_a_node_lost_mid_job_is_reported_and_its_executors_replaced(kube, testbed, kubelet_factory,
                                                                    driver_factory):
    """Both executors run on a node that stops reporting mid-job (its containers die, its
    kubelet goes silent): the node lifecycle controller marks their pods not ready, stoker
    tells the driver NODE_LOST for each and creates replacements on the node that is left, the
    job's answer is right, and once the lost machine's Node is deleted (as a cloud provider's
    node controller does) no pod of the application is left."""
    label = "stoker.dev/e2e-pool"
    lost = kubelet_factory("lost-node")
    testbed.api.merge_patch(f"/api/v1/nodes/{lost.node}", {"metadata": {"labels": {label: "lost"}}})
    node = f"/api/v1/nodes/{PROCESS_NODE}"
    watch = testbed.api.watch("/api/v1/pods", labelSelector=selector(kube.instance))
    driver = driver_factory(kube, "--executors", "2", "--slow-ms", "1500", "--partitions", "40",
                            *k8s_args("default", "--conf", f"spark.kubernetes.node.selector.{label}=lost"))
    try:
        driver.wait_event("job-start", timeout=180)
        app_id = driver.event("started")["app_id"]
        pods = wait_until(lambda: (lambda r: r if len(r) == 2 else None)(running_pods(testbed, kube.instance, app_id)),
                          120, "two running executor pods")
        assert {p["spec"]["nodeName"] for p in pods} == {lost.node}
        wait_tasks_running(pod_logs(lost, pods), 2)
        lost.lose()
        # Replacements may run on the node that is left.
        testbed.api.merge_patch(node, {"metadata": {"labels": {label: "lost"}}})
        wait_until(lambda: len(re.findall(r"stoker: executor [12] exited.*\(NODE_LOST\)", driver.log())) == 2, 150,
                   "the driver to hear that both executors were lost with their node")
        check_result(driver.wait(timeout=400))
        added = {o["metadata"]["labels"]["spark-exec-id"]: o for t, o in watch.objects() if t == "ADDED"}
        assert {"1", "2", "3", "4"} <= set(added), sorted(added)
        # The lost pods cannot finish terminating on a silent node; the Node's deletion lets
        # Kubernetes' pod garbage collector remove them.
        testbed.api.delete(f"/api/v1/nodes/{lost.node}")
        wait_until(lambda: not pods_of(testbed, kube.instance, app_id), 120, "no pod of the application left")
    finally:
        watch.close()
        testbed.api.merge_patch(node, {"metadata": {"labels": {label: None}}})


def test_a_small_application_is_not_held_behind_another_applications_ramp(kube, testbed, kubelet_factory,
                                                                          driver_factory):
    """Creations are handed to applications in turn: a driver asking for 1 executor while
    another's 200 are being created (slowly here: 10 creations/s, 2 in flight) gets its pod
    next, not after the 200. Under a first-come-first-served queue it would come last."""
    node = kubelet_factory("ramp-node", mode="no-process", max_pods=260,
                           extra=("--cpu", "100000", "--memory", "100000Gi")).node
    kube.stop()
    kube.extra = ["--kube-qps", "10", "--kube-burst", "1", "--kube-create-concurrency", "2"]
    kube.start()
    # Process-less pods never register with their drivers: the drivers start without waiting.
    on_node = ("--conf", f"spark.kubernetes.node.selector.kubernetes.io/hostname={node}",
               "--conf", "spark.scheduler.maxRegisteredResourcesWaitingTime=1s")
    watch = testbed.api.watch("/api/v1/pods", labelSelector=selector(kube.instance))
    big = driver_factory(kube, "--executors", "200", *k8s_args("default", *on_node))
    big_app = big.wait_event("started", timeout=120)["app_id"]
    wait_until(lambda: any(t == "ADDED" for t, _ in watch.objects()), 60, "the big ramp's first pod")
    small = driver_factory(kube, "--executors", "1", *k8s_args("default", *on_node))
    small_app = small.wait_event("started", timeout=120)["app_id"]

    def added():
        return [o["metadata"]["labels"]["spark-app-selector"] for t, o in watch.objects() if t == "ADDED"]
    # The small driver registered before it printed "started": by then at most this many of the
    # big one's pods existed.
    big_when_small_started = added().count(big_app)
    wait_until(lambda: small_app in added(), 60, "the small application's pod")
    order = added()
    before = order[:order.index(small_app)].count(big_app)
    print(f"the small application's pod came after {before} of the big one's 200 "
          f"({big_when_small_started} existed when it had registered)")
    # Its pod is one of the next creations (2 in flight), not behind the big one's backlog.
    assert before <= big_when_small_started + 3 and before < 200, (before, big_when_small_started)
    # It did not wait for the ramp: the big application's pods go on being created after it.
    wait_until(lambda: added().count(big_app) == 200, 60, "the big ramp to finish")
    watch.close()
    big.kill9()
    small.kill9()
    wait_until(lambda: not pods_of(testbed, kube.instance), 90, "both applications' pods deleted after the lease")


@pytest.mark.long
def test_delete_on_termination_false_keeps_exited_pods(kube, testbed, driver_factory):
    """spark.kubernetes.executor.deleteOnTermination=false: a failed executor's pod stays for
    inspection (its exit code in its status); the executor is replaced as usual; pods stoker
    stops at the end are deleted."""
    driver = driver_factory(kube, "--executors", "2", "--slow-ms", "1500", "--partitions", "30",
                            *k8s_args("default", "--conf", "spark.kubernetes.executor.deleteOnTermination=false"))
    driver.wait_event("job-start", timeout=180)
    app_id = driver.event("started")["app_id"]
    pods = wait_until(lambda: (lambda r: r if len(r) >= 2 else None)(running_pods(testbed, kube.instance, app_id)),
                      120, "two running executor pods")
    victim = next(p["metadata"]["name"] for p in pods if p["metadata"]["labels"]["spark-exec-id"] == "1")
    testbed.api.annotate_pod(victim, FAULT, "exit:42")
    wait_until(lambda: re.search(r"stoker: executor 1 exited with code 42", driver.log()), 60,
               "the driver to hear of the exit")
    check_result(driver.wait(timeout=400))
    try:
        # The others go when the application ends; the failed one stays, failed.
        wait_until(lambda: [p["metadata"]["name"] for p in pods_of(testbed, kube.instance, app_id)] == [victim],
                   60, "only the failed executor's pod left")
        # Once stoker has forgotten the application it deletes nothing of it any more.
        wait_until(lambda: f"application removed app={app_id}" in kube.log_path.read_text(), 60,
                   "stoker to forget the application")
        kept = testbed.api.pod(victim)
        assert kept["status"]["phase"] == "Failed", kept["status"]
        assert not kept["metadata"].get("deletionTimestamp")
        code = kept["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"]
        assert code == 42, code
    finally:
        testbed.api.delete_pod(victim, grace=0)


# ---- executor pods as Spark builds them (issue 10) ------------------------------------------

def test_deploy_manifests_use_only_flags_stoker_knows(testbed):
    """deploy/base and the TLS overlay render, and every `stoker serve` flag they pass exists."""
    help_text = subprocess.run([str(STOKER), "serve", "--help"], capture_output=True, text=True,
                               check=True).stdout
    for overlay, expected in (("base", ["--leader-elect"]), ("tls", ["--tls-cert", "--tls-key", "--metrics-tls"])):
        rendered = testbed.kubectl("kustomize", str(ROOT / "deploy" / overlay)).stdout
        flags = set(re.findall(r"^\s*- (--[a-z-]+)", rendered, re.M))
        for flag in expected:
            assert flag in flags, (overlay, flag, sorted(flags))
        for flag in flags:
            assert re.search(rf"\s{re.escape(flag)}\b", help_text), f"deploy/{overlay} passes unknown {flag}"
