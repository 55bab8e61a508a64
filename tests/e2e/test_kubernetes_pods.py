"""Executor pods as Spark builds them, on the test bed: the pod stoker creates equals the one
Spark's own backend creates for the same configuration (volumes, secrets, resources, placement,
placeholders, GPUs, ...); what the executors read from their mounts; keys refused by name at
registration; on-demand claims and their owners."""
import json
import re
import signal
import os
import subprocess
import sys
import time

import pytest

from types import SimpleNamespace

from conftest import JOBS, JAR, PROCESS_NODE, wait_until
from test_kubernetes import (  # noqa: F401  (fixtures: the autouse token one, kube, namespaces)
    IMAGE,
    _driver_tokens,
    conf_args,
    driver_service_account,
    driver_token,
    in_cluster_driver_pod,
    k8s_args,
    kube,
    namespaces,
    pods_of,
)


def run_job(job, master, work_dir, env, *args, timeout=300):
    """Runs tests/e2e/jobs/<job> to the end; returns its JSON events and its log."""
    env = dict(env, STOKER_PLUGIN_JAR=str(JAR), PYSPARK_PYTHON=sys.executable,
               PYSPARK_DRIVER_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1")
    env.pop("SPARK_HOME", None)
    stamp = time.monotonic_ns()
    out_path, log_path = work_dir / f"{job}-{stamp}.out", work_dir / f"{job}-{stamp}.log"
    proc = subprocess.Popen([sys.executable, str(JOBS / job), master, *args],
                            stdout=open(out_path, "w"), stderr=open(log_path, "w"), env=env,
                            start_new_session=True)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        raise AssertionError(f"{job} did not finish in {timeout}s:\n{log_path.read_text()[-6000:]}")
    events = [json.loads(l) for l in out_path.read_text().splitlines() if l.startswith("{")]
    return code, events, log_path.read_text()


def mounts_confs(ns, host_dir):
    """The issue's example: a hostPath volume, a mounted secret, a secretKeyRef variable. A pod
    template's variables tell the job where the mounts are: the process kubelet rewrites container
    paths in a container's environment to the local directories it mounted (spark.executorEnv.*
    would not do: PySpark hands those to its workers as configured, unrewritten)."""
    v = "spark.kubernetes.executor.volumes.hostPath.data."
    template = host_dir.parent / "executor-template.yaml"
    template.write_text(json.dumps({"apiVersion": "v1", "kind": "Pod", "spec": {"containers": [{
        "name": "spark-kubernetes-executor",
        "env": [{"name": "DATA_DIR", "value": "/data"}, {"name": "SECRET_DIR", "value": "/mnt/s1"}]}]}}))
    return {
        # stoker's --auth kubernetes: the driver's ServiceAccount token (Spark's backend ignores it).
        "spark.stoker.auth.tokenFile": str(driver_token(ns)),
        "spark.kubernetes.executor.podTemplateFile": str(template),
        "spark.kubernetes.namespace": ns,
        "spark.kubernetes.container.image": IMAGE,
        "spark.kubernetes.node.selector.kubernetes.io/hostname": PROCESS_NODE,
        "spark.executorEnv.PYSPARK_PYTHON": sys.executable,
        v + "mount.path": "/data",
        v + "options.path": str(host_dir),
        "spark.kubernetes.executor.secrets.s1": "/mnt/s1",
        "spark.kubernetes.executor.secretKeyRef.MY_SECRET": "s1:k",
    }


def comparable(pod, app_ids=()):
    """An executor pod without what is expected to differ between two applications and between
    stoker and Spark's own backend: names, ids (`app_ids` wherever they appear), driver ports,
    random suffixes, stoker's own labels and annotations, owner, node and status."""
    pod = json.loads(json.dumps(pod))
    meta = pod["metadata"]
    for k in ("name", "generateName", "uid", "resourceVersion", "creationTimestamp", "managedFields",
              "ownerReferences", "generation", "deletionTimestamp", "deletionGracePeriodSeconds"):
        meta.pop(k, None)
    for k in ("spark-exec-id", "spark-app-selector", "app.kubernetes.io/managed-by",
              "stoker.dev/instance", "stoker.dev/app"):
        (meta.get("labels") or {}).pop(k, None)
    meta["annotations"] = {k: v for k, v in (meta.get("annotations") or {}).items()
                           if not k.startswith("stoker.dev/")}
    pod.pop("status", None)
    spec = pod["spec"]
    for k in ("hostname", "nodeName"):
        spec.pop(k, None)
    for c in spec["containers"]:
        for e in c.get("env") or []:
            if e["name"] in ("SPARK_EXECUTOR_ID", "SPARK_APPLICATION_ID"):
                e["value"] = "<id>"
            elif "value" in e:
                e["value"] = re.sub(r"(127\.0\.0\.1:|driver\.port=)\d+", r"\1<port>", e["value"])
    text = json.dumps(pod)
    for app_id in app_ids:
        text = text.replace(app_id, "<app>")
    text = re.sub(r"spark-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "spark-<uuid>", text)
    text = re.sub(r"spark-exec-[0-9a-f]+-conf-map", "spark-exec-<hex>-conf-map", text)
    # OnDemand claims are named after the pod: Spark's `<prefix>-exec-<id>-pvc-<n>`, stoker's
    # `<stoker pod name>-pvc-<n>`.
    text = re.sub(r'"claimName": "[^"]*-exec-\d+-pvc-(\d+)"', r'"claimName": "<pod>-pvc-\1"', text)
    # The service account admission plugin's token volume.
    text = re.sub(r"kube-api-access-[a-z0-9]+", "kube-api-access-<suffix>", text)
    return json.loads(text)


def json_diff(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in json_diff(a.get(k), b.get(k), f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in json_diff(x, y, f"{path}/{i}")]
    return [] if a == b else [f"{path}: spark={json.dumps(a)} stoker={json.dumps(b)}"]


def run_under_both(testbed, kube, work_dir, confs, want=None):
    """Runs read_mounts.py with `confs` under Spark's own backend, then under stoker; checks what
    the executors read against `want`; returns the app ids and each application's first executor
    pod, as the API server stored it on creation."""
    ns = confs["spark.kubernetes.namespace"]
    watch = testbed.api.watch(f"/api/v1/namespaces/{ns}/pods", labelSelector="spark-role=executor")
    try:
        runs = {}
        for name, master in (("spark", f"k8s://https://127.0.0.1:{testbed.port}"), ("stoker", kube.address)):
            tls = kube.driver_confs() if name == "stoker" else []
            code, events, log = run_job("read_mounts.py", master, work_dir, testbed.client_env(),
                                        *tls, "--executors", "1", *conf_args(confs))
            assert code == 0, f"{name}: driver failed ({code}):\n{log[-8000:]}"
            result = next(e for e in events if e["event"] == "result")
            for read in result["reads"] if want else []:
                assert {k: read[k] for k in want} == want, f"{name}: {read}"
            runs[name] = next(e for e in events if e["event"] == "started")["app_id"]
        first = {}
        for _, pod in watch.objects():
            first.setdefault(pod["metadata"]["labels"]["spark-app-selector"], pod)
        return runs, first[runs["spark"]], first[runs["stoker"]]
    finally:
        watch.close()


def assert_same_pod(runs, spark_pod, stoker_pod):
    app_ids = (runs["spark"], runs["stoker"])
    differences = json_diff(comparable(spark_pod, app_ids), comparable(stoker_pod, app_ids))
    print("\n[pod equivalence] fields removed before comparing: names, ids, driver ports, "
          "random suffixes, stoker's labels/annotations, owner, node, status")
    print("[pod equivalence] differences:\n  " + ("\n  ".join(differences) or "none"))
    assert not differences
    assert stoker_pod["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "stoker"


def test_executors_read_a_host_path_a_mounted_secret_and_a_secret_env_as_under_spark(
        kube, testbed, work_dir, namespaces):
    """The issue's example: under stoker the executors read the hostPath file, the mounted secret
    and the secretKeyRef variable; the pod stoker creates equals the one Spark's own backend
    creates on the same bed for the same configuration, apart from the fields expected to
    differ; the executor ConfigMap is created for the application and deleted with it."""
    ns = namespaces("sparkpods")
    testbed.api.create(f"/api/v1/namespaces/{ns}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s1"},
        "stringData": {"k": "s3cret"}})
    host_dir = work_dir / "host-data"
    host_dir.mkdir()
    (host_dir / "input.txt").write_text("from-the-host\n")
    confs = mounts_confs(ns, host_dir)
    want = {"data": "from-the-host", "secret_file": "s3cret", "secret_env": "s3cret"}
    maps_watch = testbed.api.watch(f"/api/v1/namespaces/{ns}/configmaps", labelSelector="spark-role=executor")
    try:
        runs, spark_pod, stoker_pod = run_under_both(testbed, kube, work_dir, confs, want)
        assert_same_pod(runs, spark_pod, stoker_pod)
        # The executor ConfigMap of the stoker application: created, mounted, deleted at the end.
        created = [o for t, o in maps_watch.objects() if t == "ADDED"
                   and o["metadata"]["labels"].get("spark-app-selector") == runs["stoker"]]
        assert len(created) == 1, created
        assert created[0]["metadata"]["labels"]["stoker.dev/instance"] == kube.instance
        name = created[0]["metadata"]["name"]
        wait_until(lambda: not testbed.api.get_opt(f"/api/v1/namespaces/{ns}/configmaps/{name}"), 60,
                   "the executor ConfigMap deleted with the application")
    finally:
        maps_watch.close()


def test_executor_pod_equals_sparks_with_resources_placement_local_dirs_and_placeholders(
        kube, testbed, work_dir, namespaces):
    """A second configuration: CPU request and limit, memory overhead, executor labels and an
    annotation with {{APP_ID}}, {{APP_ID}} and {{EXECUTOR_ID}} in the Java options, tmpfs local
    dirs, a memory-backed emptyDir with a size limit, and a pod template with a toleration, a
    label and a variable. Spark's own backend and stoker create the same pod."""
    ns = namespaces("sparkpods2")
    template = work_dir / "template2.yaml"
    template.write_text(json.dumps({"apiVersion": "v1", "kind": "Pod",
                                    "metadata": {"labels": {"from-template": "yes"}},
                                    "spec": {"tolerations": [{"key": "dedicated", "operator": "Equal",
                                                              "value": "spark", "effect": "NoSchedule"}],
                                             "containers": [{"name": "spark-kubernetes-executor",
                                                             "env": [{"name": "FROM_TEMPLATE", "value": "1"}]}]}}))
    v = "spark.kubernetes.executor.volumes.emptyDir.scratch."
    confs = {
        "spark.stoker.auth.tokenFile": str(driver_token(ns)),
        "spark.kubernetes.namespace": ns,
        "spark.kubernetes.container.image": IMAGE,
        "spark.kubernetes.node.selector.kubernetes.io/hostname": PROCESS_NODE,
        "spark.executorEnv.PYSPARK_PYTHON": sys.executable,
        "spark.kubernetes.executor.podTemplateFile": str(template),
        "spark.kubernetes.executor.request.cores": "500m",
        "spark.kubernetes.executor.limit.cores": "2",
        "spark.executor.memoryOverhead": "400m",
        "spark.kubernetes.executor.label.team": "data",
        "spark.kubernetes.executor.annotation.note": "app-{{APP_ID}}",
        "spark.executor.extraJavaOptions": "-Dexec.id={{EXECUTOR_ID}} -Dapp.id={{APP_ID}}",
        "spark.kubernetes.local.dirs.tmpfs": "true",
        v + "mount.path": "/scratch",
        v + "options.medium": "Memory",
        v + "options.sizeLimit": "1Gi",
    }
    runs, spark_pod, stoker_pod = run_under_both(testbed, kube, work_dir, confs)
    assert_same_pod(runs, spark_pod, stoker_pod)
    # Not vacuous: the settings are in the pods compared.
    c = stoker_pod["spec"]["containers"][-1]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert any(v == "-Dexec.id=1" for k, v in env.items() if k.startswith("SPARK_JAVA_OPT_")), env
    assert env["FROM_TEMPLATE"] == "1"
    assert (c["resources"]["requests"]["cpu"], c["resources"]["limits"]["cpu"]) == ("500m", "2")
    assert c["resources"]["limits"]["memory"] == "912Mi", "512 MiB heap + 400 MiB overhead"
    assert any(t.get("key") == "dedicated" for t in stoker_pod["spec"]["tolerations"])
    assert stoker_pod["metadata"]["annotations"]["note"] == f"app-{runs['stoker']}"


@pytest.mark.parametrize("key,value,named", [
    ("spark.kubernetes.executor.volumes.hostPath.data.mount.path", None,
     "spark.kubernetes.executor.volumes.hostPath.data.mount.path: missing"),
    ("spark.kubernetes.executor.volumes.gluster.data.mount.path", "/g",
     "spark.kubernetes.executor.volumes.gluster.data.mount.path: unknown volume type"),
    ("spark.kubernetes.executor.secretKeyRef.MY_SECRET", "s1",
     "spark.kubernetes.executor.secretKeyRef.MY_SECRET: 's1' is not <secret name>:<key>"),
    ("spark.kubernetes.allocation.pods.allocator", "statefulset",
     "spark.kubernetes.allocation.pods.allocator: stoker creates the pods itself"),
])
def test_bad_or_unhonoured_keys_are_refused_at_registration_by_name(kube, testbed, work_dir, key, value,
                                                                     named):
    """Bad input, and (with spark.stoker.strictConf=true) a key stoker does not honour: the
    registration is refused with INVALID_ARGUMENT naming the key, and nothing is created."""
    confs = mounts_confs("default", work_dir / "host-data")
    if value is None:
        confs.pop(key)
    else:
        confs[key] = value
    confs["spark.stoker.strictConf"] = "true"
    code, _, log = run_job("read_mounts.py", kube.address, work_dir, testbed.client_env(),
                           *kube.driver_confs(), *conf_args(confs), timeout=120)
    assert code != 0, log[-4000:]
    refused = re.search(r"refused to register application \S+: INVALID_ARGUMENT: ([^\n]*)", log)
    assert refused, log[-6000:]
    assert named in refused.group(1), refused.group(1)
    assert not pods_of(testbed, kube.instance)
    assert not testbed.api.get("/api/v1/configmaps", labelSelector=f"stoker.dev/instance={kube.instance}")["items"]


def test_on_demand_claims_are_created_after_the_pod_and_owned_by_it(kube, testbed, work_dir, driver_factory):
    """An OnDemand persistentVolumeClaim volume: stoker creates the executor's claim after its
    pod, named after the pod and owned by it (no driver pod), so the claim goes with the pod. Its
    storage class does not exist, so the claim never binds and the executor never runs: the
    driver is killed instead.
    A key stoker does not honour, without spark.stoker.strictConf: a driver warning naming it."""
    v = "spark.kubernetes.executor.volumes.persistentVolumeClaim.data."
    confs = {
        v + "mount.path": "/data",
        v + "options.claimName": "OnDemand",
        v + "options.storageClass": "stoker-e2e-none",
        v + "options.sizeLimit": "1Gi",
        "spark.kubernetes.executor.podDeletionCost": "5",
    }
    driver = driver_factory(kube, "--executors", "1", *k8s_args("default", *conf_args(confs)))
    # The driver waits for its executor before it prints "started": the pod tells the app id.
    [pod] = wait_until(lambda: pods_of(testbed, kube.instance), 120, "the executor pod")
    name, app_id = pod["metadata"]["name"], pod["metadata"]["labels"]["spark-app-selector"]
    claim = wait_until(
        lambda: testbed.api.get_opt(f"/api/v1/namespaces/default/persistentvolumeclaims/{name}-pvc-0"),
        60, "the on-demand claim")
    [owner] = claim["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("Pod", name, pod["metadata"]["uid"])
    assert claim["metadata"]["labels"]["spark-app-selector"] == app_id
    assert claim["metadata"]["labels"]["stoker.dev/instance"] == kube.instance
    assert claim["spec"]["storageClassName"] == "stoker-e2e-none"
    [volume] = [x for x in pod["spec"]["volumes"] if x["name"] == "data"]
    assert volume["persistentVolumeClaim"]["claimName"] == f"{name}-pvc-0"
    assert "stoker: spark.kubernetes.executor.podDeletionCost is not honoured" in driver.log()
    driver.kill9()
    wait_until(lambda: not pods_of(testbed, kube.instance, app_id), 60, "the pod deleted within the lease")
    wait_until(lambda: not testbed.api.get_opt(f"/api/v1/namespaces/default/persistentvolumeclaims/{name}-pvc-0"),
               60, "the claim garbage-collected with its pod")


def test_an_in_cluster_driver_owns_the_on_demand_claims(kube, testbed, process_kubelet, work_dir):
    """spark.kubernetes.driver.ownPersistentVolumeClaim (Spark's default) with a driver pod: the
    executor's OnDemand claim is owned by the driver pod, not by the executor's pod, and goes
    with the driver pod (garbage collector; stoker is down by then)."""
    name = "driver-pvc"
    v = "spark.kubernetes.executor.volumes.persistentVolumeClaim.data."
    command = [sys.executable, str(JOBS / "shuffle.py"), kube.address, *kube.driver_confs(), "--executors", "1",
               *conf_args({v + "mount.path": "/data", v + "options.claimName": "OnDemand",
                           v + "options.storageClass": "stoker-e2e-none", v + "options.sizeLimit": "1Gi"})]
    pod = in_cluster_driver_pod(name, command, process_kubelet.node)
    uid = testbed.api.create_pod(pod)["metadata"]["uid"]
    try:
        [executor] = wait_until(lambda: pods_of(testbed, kube.instance), 180, "the executor pod")
        claim_path = f"/api/v1/namespaces/default/persistentvolumeclaims/{executor['metadata']['name']}-pvc-0"
        claim = wait_until(lambda: testbed.api.get_opt(claim_path), 60, "the on-demand claim")
        owners = claim["metadata"].get("ownerReferences") or []
        assert [(o["kind"], o["name"], o["uid"]) for o in owners] == [("Pod", name, uid)], owners
        kube.kill9()  # nobody left to delete them but the garbage collector
    finally:
        testbed.api.delete_pod(name, grace=0)
    wait_until(lambda: not pods_of(testbed, kube.instance), 60, "the executor pod garbage-collected")
    wait_until(lambda: not testbed.api.get_opt(claim_path), 60, "the claim garbage-collected with the driver pod")


def first_pods_under_both(testbed, kube, driver_factory, confs):
    """For configurations whose pods cannot run on this bed (an nfs server, a GPU, a node that
    does not exist): each backend's first executor pod as the API server stored it on creation.
    The drivers are killed then; Spark's pods are deleted by the test (nothing else would: no
    driver pod owns them), stoker's go when the driver's lease ends."""
    ns = confs["spark.kubernetes.namespace"]
    masters = {"spark": SimpleNamespace(address=f"k8s://https://127.0.0.1:{testbed.port}"), "stoker": kube}
    first = {}
    for name, master in masters.items():
        watch = testbed.api.watch(f"/api/v1/namespaces/{ns}/pods", labelSelector="spark-role=executor")
        try:
            driver = driver_factory(master, "--executors", "1", *conf_args(confs), job="read_mounts.py")
            _, first[name] = watch.wait_for(lambda t, o: t == "ADDED", 180, f"{name}: the first executor pod")
        finally:
            watch.close()
        driver.kill9()
        app_id = first[name]["metadata"]["labels"]["spark-app-selector"]
        if name == "spark":
            for p in testbed.api.pods(ns, labelSelector=f"spark-app-selector={app_id}"):
                testbed.api.delete_pod(p["metadata"]["name"], ns, grace=0)
        wait_until(lambda: not testbed.api.pods(ns, labelSelector=f"spark-app-selector={app_id}"), 60,
                   f"{name}: the pods of the killed driver gone")
    runs = {name: pod["metadata"]["labels"]["spark-app-selector"] for name, pod in first.items()}
    return runs, first["spark"], first["stoker"]


def test_executor_pod_equals_sparks_with_nfs_claims_gpus_and_pull_settings(
        kube, testbed, driver_factory, namespaces, monkeypatch):
    """A third configuration, of pods that cannot run here: an nfs volume (read-only, subPath),
    a named claim mounted with a subPathExpr, an OnDemand claim with a storage class and size,
    a GPU (`spark.executor.resource.gpu.*`), the image pull policy and pull secrets, the
    executor service account, an executor node selector, and `spark.kubernetes.hadoop.configMapName`
    (with a driver outside the cluster neither backend mounts it in the executor: Spark's executor
    step reads only the internal key spark-submit's cluster mode sets). Spark's own backend and
    stoker create the same pod."""
    ns = namespaces("sparkpods3")
    driver_service_account(ns)
    monkeypatch.setenv("KUBECONFIG", testbed.env["KUBECONFIG"])  # Spark's own backend's client
    nfs = "spark.kubernetes.executor.volumes.nfs.share."
    ref = "spark.kubernetes.executor.volumes.persistentVolumeClaim.ref."
    data = "spark.kubernetes.executor.volumes.persistentVolumeClaim.data."
    confs = {
        "spark.stoker.auth.tokenFile": str(driver_token(ns)),
        "spark.kubernetes.namespace": ns,
        "spark.kubernetes.container.image": IMAGE,
        "spark.executorEnv.PYSPARK_PYTHON": sys.executable,
        nfs + "mount.path": "/share",
        nfs + "mount.readOnly": "true",
        nfs + "mount.subPath": "team-a",
        nfs + "options.server": "nfs.example.com",
        nfs + "options.path": "/exports",
        ref + "mount.path": "/ref",
        ref + "mount.subPathExpr": "exec-$(SPARK_EXECUTOR_ID)",
        ref + "options.claimName": "reference-data",
        data + "mount.path": "/data",
        data + "options.claimName": "OnDemand",
        data + "options.storageClass": "stoker-e2e-none",
        data + "options.sizeLimit": "2Gi",
        "spark.executor.resource.gpu.amount": "1",
        "spark.executor.resource.gpu.vendor": "nvidia.com",
        "spark.executor.resource.gpu.discoveryScript": "/opt/spark/examples/src/main/scripts/getGpusResources.sh",
        "spark.kubernetes.container.image.pullPolicy": "Always",
        "spark.kubernetes.container.image.pullSecrets": "regcred",
        "spark.kubernetes.authenticate.executor.serviceAccountName": "spark",
        "spark.kubernetes.executor.node.selector.disk": "ssd",
        "spark.kubernetes.hadoop.configMapName": "hadoop-conf",
    }
    runs, spark_pod, stoker_pod = first_pods_under_both(testbed, kube, driver_factory, confs)
    assert_same_pod(runs, spark_pod, stoker_pod)
    # Not vacuous: the settings are in the pods compared.
    spec = stoker_pod["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["share"]["nfs"] == {"server": "nfs.example.com", "path": "/exports"}, volumes["share"]
    assert volumes["ref"]["persistentVolumeClaim"]["claimName"] == "reference-data"
    assert volumes["data"]["persistentVolumeClaim"]["claimName"].endswith("-pvc-0")
    c = spec["containers"][-1]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert (mounts["share"].get("readOnly"), mounts["share"].get("subPath")) == (True, "team-a")
    assert mounts["ref"].get("subPathExpr") == "exec-$(SPARK_EXECUTOR_ID)"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["imagePullPolicy"] == "Always"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["serviceAccountName"] == "spark"
    assert spec["nodeSelector"] == {"disk": "ssd"}
    for pod in (spark_pod, stoker_pod):
        assert "hadoop-conf" not in json.dumps(pod["spec"]), "client mode: no Hadoop conf volume under either"
