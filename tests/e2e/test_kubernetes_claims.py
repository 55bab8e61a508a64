"""On-demand claims on the test bed, under stoker and under Spark's own backend: provisioned
(the controller manager's hostPath provisioner), mounted by the process kubelet, owned by the
driver pod, and taken over by the replacement of a lost executor
(`spark.kubernetes.driver.reusePersistentVolumeClaim`), which finds the lost executor's shuffle
files there with Spark's `KubernetesLocalDiskShuffleDataIO`."""
import re
import sys
from types import SimpleNamespace

import pytest

from conftest import PROCESS_NODE, wait_until
from test_kubernetes import (  # noqa: F401  (fixtures: the autouse token one, kube)
    IMAGE,
    _driver_tokens,
    conf_args,
    driver_token,
    kube,
)
from testbed import ensure_hostpath_storage_class

LOCAL_DIR = "spark-local-dir-1"
V = f"spark.kubernetes.executor.volumes.persistentVolumeClaim.{LOCAL_DIR}."
# Spark's documented layout for shuffle recovery: KubernetesLocalDiskShuffleDataIO looks two
# levels above the local dir for spark-*/executor-*/blockmgr-* folders of earlier executors.
MOUNT = "/data/spark-x/executor-x"


def recovery_confs(ns, driver_pod, storage_class):
    return {
        V + "mount.path": MOUNT,
        V + "mount.readOnly": "false",
        V + "options.claimName": "OnDemand",
        V + "options.storageClass": storage_class,
        V + "options.sizeLimit": "1Gi",
        "spark.kubernetes.driver.ownPersistentVolumeClaim": "true",
        # Spark's default, but the executors read it from the conf to recover (default false).
        "spark.kubernetes.driver.reusePersistentVolumeClaim": "true",
        "spark.shuffle.sort.io.plugin.class": "org.apache.spark.shuffle.KubernetesLocalDiskShuffleDataIO",
        "spark.kubernetes.driver.pod.name": driver_pod,
        "spark.kubernetes.namespace": ns,
        "spark.kubernetes.container.image": IMAGE,
        "spark.kubernetes.node.selector.kubernetes.io/hostname": PROCESS_NODE,
        "spark.executorEnv.PYSPARK_PYTHON": sys.executable,
        # stoker's --auth kubernetes (Spark's own backend ignores it).
        "spark.stoker.auth.tokenFile": str(driver_token(ns)),
    }


def placeholder_driver_pod(testbed, name, ns="default"):
    """The driver's pod as both backends see it (owner of the claims and executor pods): the
    driver process runs on this machine, the pod stays Pending (no node matches)."""
    return testbed.api.create_pod({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"spark-role": "driver"}},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
                 "nodeSelector": {"stoker.dev/no-such-node": "true"},
                 "containers": [{"name": "driver", "image": "python:3.11", "command": ["true"]}]},
    }, ns)


def claim_of(pod):
    [volume] = [v for v in pod["spec"]["volumes"] if v["name"] == LOCAL_DIR]
    return volume["persistentVolumeClaim"]["claimName"]


def app_pods(testbed, app_id, ns="default"):
    return testbed.api.pods(ns, labelSelector=f"spark-app-selector={app_id}")


def run_with_a_lost_executor(testbed, driver_factory, master, name, storage_class, ns="default",
                             before_the_loss=lambda: None):
    """One application under `master`: writes a shuffle with 2 executors, runs
    `before_the_loss`, loses one executor (its pod deleted), reads the shuffle again. Returns
    what the job and the API server saw."""
    driver_pod = f"recovery-{name}"
    uid = placeholder_driver_pod(testbed, driver_pod, ns)["metadata"]["uid"]
    claims_watch = testbed.api.watch(f"/api/v1/namespaces/{ns}/persistentvolumeclaims")
    pods_watch = testbed.api.watch(f"/api/v1/namespaces/{ns}/pods", labelSelector="spark-role=executor")
    try:
        d = driver_factory(master, "--executors", "2", "--maps", "8", "--recovery-timeout-s", "40",
                           *conf_args(recovery_confs(ns, driver_pod, storage_class)),
                           job="shuffle_recovery.py")
        app_id = d.wait_event("started", timeout=180)["app_id"]
        shuffled = d.wait_event("shuffled", timeout=300)
        assert shuffled["map_runs"] == 8, shuffled
        pods = {p["metadata"]["labels"]["spark-exec-id"]: p for p in app_pods(testbed, app_id, ns)}
        before_the_loss()
        victim = pods[shuffled["executors"][0]]
        lost_claim = claim_of(victim)
        testbed.api.delete_pod(victim["metadata"]["name"], ns, grace=0)
        result = d.wait(timeout=300)
        replaced = d.event("replaced")
        outputs = d.event("outputs")
        # As created (the pods are gone once the driver has stopped).
        [replacement] = [p for t, p in pods_watch.objects() if t == "ADDED"
                         and p["metadata"]["labels"].get("spark-app-selector") == app_id
                         and p["metadata"]["labels"].get("spark-exec-id") == replaced["executor"]] or [None]
        added = {o["metadata"]["name"]: o for t, o in claims_watch.objects() if t == "ADDED"
                 and (o["metadata"].get("labels") or {}).get("spark-app-selector") == app_id}
        created = sorted(added)
        owners = {c: [(o["kind"], o["name"], o["uid"]) for o in o_["metadata"].get("ownerReferences") or []]
                  for c, o_ in added.items()}
        run = SimpleNamespace(app_id=app_id, result=result, replaced=replaced, outputs=outputs,
                              lost_claim=lost_claim,
                              replacement_claim=claim_of(replacement) if replacement else None,
                              claims=created, owners=owners, driver_uid=uid, driver_pod=driver_pod)
        print(f"\n[claims] {name}: lost executor {shuffled['executors'][0]} (claim {lost_claim}), "
              f"replacement {replaced['executor']} registered {replaced['seconds']} s after the loss "
              f"mounts {run.replacement_claim}; map outputs {outputs['available']}/{outputs['of']} "
              f"available {outputs['seconds']} s after the loss; map tasks recomputed "
              f"{result['maps_recomputed']}; claims created {len(created)}")
        return run
    finally:
        claims_watch.close()
        pods_watch.close()
        testbed.api.delete_pod(driver_pod, ns, grace=0)


def restarting(kube):
    """stoker SIGKILLed and started again: what it knew of the claims is gone; the driver
    re-attaches and stoker learns the claims again from the API server."""
    def restart():
        kube.kill9()
        kube.restart_on_same_port()
        log = lambda: kube.log_path.read_text()
        wait_until(lambda: "driver re-registered" in log(), 60, "the driver to re-register")
        wait_until(lambda: "claims from before this stoker started are offered" in log(), 30,
                   "stoker to learn the application's claims")
    return restart


def check_stoker_run(run):
    """The replacement mounted the lost executor's claim (no third claim), every claim is the
    driver pod's, the lost outputs were recovered and nothing was recomputed."""
    assert run.result["right"], run.result
    assert run.replacement_claim == run.lost_claim, (run.replacement_claim, run.lost_claim)
    assert len(run.claims) == 2, run.claims
    for claim, owners in run.owners.items():
        assert owners == [("Pod", run.driver_pod, run.driver_uid)], (claim, owners)
    assert run.outputs["recovered"], run.outputs
    assert run.result["maps_recomputed"] == 0, run.result


def claims_gone(testbed, *runs):
    """The driver pod went: its claims go too (garbage collector; stoker deleted them already)."""
    for run in runs:
        for claim in run.claims:
            wait_until(lambda: not testbed.api.get_opt(f"/api/v1/namespaces/default/persistentvolumeclaims/{claim}"),
                       90, f"claim {claim} deleted with its driver pod")


def test_a_replacement_executor_takes_over_the_lost_executors_claim_and_its_shuffle_files(
        kube, testbed, process_kubelet, driver_factory):
    """The issue's scenario under stoker: an executor's pod is deleted after the map stage, after
    stoker itself was SIGKILLed and restarted (so the claims it reuses are ones it learnt again
    from the API server when the driver re-attached). The replacement mounts the lost executor's
    claim (no third claim is created), recovers its shuffle files, and the second read of the
    shuffle recomputes no map task. Every claim is the driver pod's and goes when it goes."""
    storage_class = ensure_hostpath_storage_class(testbed.api)
    run = run_with_a_lost_executor(testbed, driver_factory, kube, "stoker", storage_class,
                                   before_the_loss=restarting(kube))
    check_stoker_run(run)
    claims_gone(testbed, run)


@pytest.mark.long
def test_stoker_recomputes_no_more_than_sparks_own_backend_after_a_lost_executor(
        kube, testbed, process_kubelet, driver_factory, monkeypatch):
    """The same scenario under Spark's own backend and then under stoker (no restart) on the
    same bed: stoker recomputes no more than Spark (what Spark did is printed: on this bed its
    replacement got a new claim and it recomputed the lost outputs). Every claim is the driver
    pod's, under both."""
    storage_class = ensure_hostpath_storage_class(testbed.api)
    monkeypatch.setenv("KUBECONFIG", testbed.env["KUBECONFIG"])  # Spark's own backend's client
    spark_master = SimpleNamespace(address=f"k8s://https://127.0.0.1:{testbed.port}")
    spark = run_with_a_lost_executor(testbed, driver_factory, spark_master, "spark", storage_class)
    stoker = run_with_a_lost_executor(testbed, driver_factory, kube, "stoker", storage_class)
    assert spark.result["right"], spark.result
    for claim, owners in spark.owners.items():
        assert owners == [("Pod", spark.driver_pod, spark.driver_uid)], (claim, owners)
    check_stoker_run(stoker)
    assert stoker.result["maps_recomputed"] <= spark.result["maps_recomputed"]
    claims_gone(testbed, spark, stoker)


def test_with_wait_to_reuse_a_new_executor_waits_for_a_free_claim_instead_of_a_new_one(
        kube, testbed, process_kubelet, driver_factory, work_dir):
    """`spark.kubernetes.driver.waitToReusePersistentVolumeClaim=true` (Spark's allocator: no new
    claims once the driver has `maxPVCs` = spark.executor.instances of them and none is free):
    with 2 executors running, the driver asks for a third; stoker creates no pod and no claim for
    it and tells the driver once why it waits; when the driver kills its first executor, the
    executor that replaces it takes over its claim and runs (Spark lowers its total before the
    kill, so stoker may call off the waiting executor and start another: either way one new pod).
    Two claims and three pods in all, the claims the driver pod's."""
    storage_class = ensure_hostpath_storage_class(testbed.api)
    driver_pod = "claim-wait"
    uid = placeholder_driver_pod(testbed, driver_pod)["metadata"]["uid"]
    claims_watch = testbed.api.watch("/api/v1/namespaces/default/persistentvolumeclaims")
    pods_watch = testbed.api.watch("/api/v1/namespaces/default/pods", labelSelector="spark-role=executor")
    go = work_dir / "go"
    try:
        confs = recovery_confs("default", driver_pod, storage_class)
        confs["spark.kubernetes.driver.waitToReusePersistentVolumeClaim"] = "true"
        d = driver_factory(kube, "--executors", "2", "--go", str(go), *conf_args(confs), job="claim_wait.py")
        app_id = d.wait_event("started", timeout=180)["app_id"]
        first = d.wait_event("running", timeout=240)["executors"]
        pods = {p["metadata"]["labels"]["spark-exec-id"]: p for p in app_pods(testbed, app_id)}
        assert sorted(pods) == sorted(first), (sorted(pods), first)
        d.wait_event("asked", timeout=60)
        told = "on-demand claims is free to reuse, and spark.kubernetes.driver.waitToReusePersistentVolumeClaim=true"
        wait_until(lambda: told in d.log(), 60, "the driver to be told that the new executor waits")
        [line] = [l for l in d.log().splitlines() if told in l]
        waiting = re.search(r"executor (\d+) is waiting: none of the application's (\d+) on-demand", line)
        assert waiting and waiting.group(2) == "2", line
        third = waiting.group(1)
        assert third not in first
        # Waiting: no pod and no claim for it.
        assert sorted(p["metadata"]["labels"]["spark-exec-id"] for p in app_pods(testbed, app_id)) == sorted(first)

        def claims():
            return sorted(o["metadata"]["name"] for t, o in claims_watch.objects() if t == "ADDED"
                          and (o["metadata"].get("labels") or {}).get("spark-app-selector") == app_id)
        assert len(claims()) == 2, claims()
        victim_claim = claim_of(pods[min(first, key=int)])
        go.write_text("go")
        killed = d.wait_event("killed", timeout=60)["executor"]
        assert killed == min(first, key=int)
        joined = d.wait_event("joined", timeout=240)["executor"]
        assert joined not in first, (joined, first)
        [pod] = [p for p in app_pods(testbed, app_id) if p["metadata"]["labels"]["spark-exec-id"] == joined]
        assert claim_of(pod) == victim_claim, (claim_of(pod), victim_claim)
        result = d.wait(timeout=180)
        assert result["right"], result
        assert len(claims()) == 2, claims()
        created = sorted({o["metadata"]["labels"]["spark-exec-id"] for t, o in pods_watch.objects()
                          if t == "ADDED" and o["metadata"]["labels"].get("spark-app-selector") == app_id}, key=int)
        assert created == sorted([*first, joined], key=int), (created, first, joined)
        owners = {o["metadata"]["name"]: [(r["kind"], r["name"], r["uid"]) for r in o["metadata"].get("ownerReferences") or []]
                  for t, o in claims_watch.objects() if t == "ADDED" and o["metadata"]["name"] in claims()}
        assert all(v == [("Pod", driver_pod, uid)] for v in owners.values()), owners
        # Told once per waiting executor (the one started after the kill may wait a moment too,
        # until the killed executor's end frees its claim).
        waits = re.findall(r"executor (\d+) is waiting: none of the application's", d.log())
        assert third in waits and len(waits) == len(set(waits)), waits
        print(f"\n[claims] wait to reuse: executor {third} waited for a claim (no pod); executor {joined} "
              f"took over {victim_claim} of executor {killed}; pods {created}, claims created {len(claims())}")
    finally:
        claims_watch.close()
        pods_watch.close()
        testbed.api.delete_pod(driver_pod, grace=0)
