"""End-to-end tests of the Kubernetes test bed: a real control plane (tests/testbed) and the
process kubelet (tests/kubelet) running pods as local processes, up to Spark's own Kubernetes
backend running a shuffle job on it."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import JOBS, PROCESS_NODE
from testbed import (
    FAULT, alive, condition, container_pid, group_members, phase, pod_manifest,
    processes_under, running, terminated, wait_until,
)

SLEEPER = ["sh", "-c", "echo started; while true; do sleep 0.2; done"]


def uniq(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def cleanup_pods(testbed):
    """Names of pods (namespace default) to force-delete when the test ends."""
    names = []
    yield names
    for name in names:
        testbed.api.delete_pod(name, force=True)


def run_pod(testbed, cleanup_pods, manifest, timeout=60):
    """Creates the pod and waits until all its containers run."""
    name = manifest["metadata"]["name"]
    cleanup_pods.append(name)
    testbed.api.create_pod(manifest)
    return testbed.api.wait_pod(name, running, timeout, "Running")


# ---- a. pod lifecycle ---------------------------------------------------------------------------

def test_pod_lifecycle_env_volume_and_graceful_delete(testbed, process_kubelet, cleanup_pods):
    api = testbed.api
    name = uniq("life")
    api.create("/api/v1/namespaces/default/configmaps",
               {"metadata": {"name": name}, "data": {"greeting": "hello from a configmap"}})
    script = (
        "trap 'echo got-TERM; exit 7' TERM; "
        "echo \"pod=$POD_NAME ip=$POD_IP node=$NODE app=$APP\"; "
        "cat /etc/cfg/greeting; echo; echo ready; "
        "while true; do sleep 0.2; done"
    )
    manifest = pod_manifest(
        name, ["sh", "-c", script], PROCESS_NODE, labels={"app": "lifecycle"}, grace=20,
        env=[
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        ],
        volumes=[{"name": "cfg", "configMap": {"name": name}}],
        mounts=[{"name": "cfg", "mountPath": "/etc/cfg"}],
    )
    cleanup_pods.append(name)
    try:
        watch = api.watch("/api/v1/namespaces/default/pods", fieldSelector=f"metadata.name={name}")
        api.create_pod(manifest)
        _, first = watch.wait_for(lambda t, o: True, 30, "the first pod event")
        assert phase(first) == "Pending"
        _, pod = watch.wait_for(lambda t, o: running(o), 60, "pod Running")
        st = pod["status"]
        assert st["podIP"] == "127.0.0.1"
        assert st["hostIP"] == "127.0.0.1"
        assert pod["spec"]["nodeName"] == PROCESS_NODE
        [cs] = st["containerStatuses"]
        assert cs["name"] == "main" and cs["ready"] is True and cs["restartCount"] == 0
        assert condition(pod, "Ready") == "True"
        # Nothing ran before the pod was Pending; the phases seen are Pending then Running.
        phases = [phase(o) for _, o in watch.objects()]
        assert phases.index("Pending") < phases.index("Running")

        pid = container_pid(pod)
        assert pid and alive(pid), f"container pid {pid} not running"
        log_path = process_kubelet.pod_dir(pod) / "main.log"
        log = wait_until(lambda: "ready" in log_path.read_text() and log_path.read_text(), 20,
                         "the container to print ready")
        assert f"pod={name} ip=127.0.0.1 node={PROCESS_NODE} app=lifecycle" in log
        assert "hello from a configmap" in log
        # The configMap volume is a real folder of the pod.
        assert (process_kubelet.pod_dir(pod) / "volumes" / "cfg" / "greeting").read_text() \
            == "hello from a configmap"

        # Graceful deletion: SIGTERM reaches the trap, exit 7 is reported, then the object goes.
        api.delete_pod(name)
        _, gone = watch.wait_for(lambda t, o: t == "DELETED", 60, "the pod object to be deleted")
        finals = [terminated(o) for _, o in watch.objects() if terminated(o)]
        assert finals, "no terminated state was reported before deletion"
        assert finals[-1]["exitCode"] == 7, finals[-1]
        assert finals[-1]["reason"] == "Error"
        assert "got-TERM" in log_path.read_text()
        assert api.pod(name) is None
        wait_until(lambda: not group_members(pid), 10, "the container processes to end")
        watch.close()
    finally:
        api.delete("/api/v1/namespaces/default/configmaps/" + name)


def test_sigterm_ignored_then_sigkill_after_grace(testbed, process_kubelet, cleanup_pods):
    api = testbed.api
    name = uniq("stubborn")
    script = ("trap 'T=1; echo got-TERM' TERM; echo ready; "
              "while true; do sleep 0.2; [ -n \"$T\" ] && echo alive-after-TERM; done")
    manifest = pod_manifest(name, ["sh", "-c", script], PROCESS_NODE, grace=3)
    pod = run_pod(testbed, cleanup_pods, manifest)
    pid = container_pid(pod)
    log_path = process_kubelet.pod_dir(pod) / "main.log"
    wait_until(lambda: "ready" in log_path.read_text(), 20, "ready")
    watch = api.watch("/api/v1/namespaces/default/pods", fieldSelector=f"metadata.name={name}")
    api.delete_pod(name)
    watch.wait_for(lambda t, o: t == "DELETED", 60, "the pod object to be deleted")
    t = [terminated(o) for _, o in watch.objects() if terminated(o)]
    assert t and t[-1]["exitCode"] == 137, t
    log = log_path.read_text()
    # It got SIGTERM, kept running through the grace period, and only SIGKILL ended it.
    assert "got-TERM" in log
    assert "alive-after-TERM" in log
    assert not group_members(pid)
    watch.close()


# ---- b. faults ----------------------------------------------------------------------------------

def test_real_oom_kill(testbed, process_kubelet, cleanup_pods):
    # Allocates (and touches) 10 MiB every 50 ms up to 400 MiB against a 64 MiB limit.
    alloc = ("import time\nb=[]\nfor _ in range(40):\n    b.append(b'x' * (10 << 20))\n"
             "    time.sleep(0.05)\nprint('survived', flush=True)\ntime.sleep(600)\n")
    name = uniq("oom")
    cleanup_pods.append(name)
    testbed.api.create_pod(pod_manifest(name, [sys.executable, "-c", alloc], PROCESS_NODE,
                                        memory_limit="64Mi"))
    pod = testbed.api.wait_pod(name, lambda p: phase(p) in ("Failed", "Succeeded"), 60, "to end")
    assert phase(pod) == "Failed"
    t = terminated(pod)
    assert t["reason"] == "OOMKilled", t
    assert t["exitCode"] == 137
    assert "survived" not in (process_kubelet.pod_dir(pod) / "main.log").read_text()


def test_real_oom_kill_counts_and_kills_children_in_process_groups_of_their_own(
        testbed, process_kubelet, cleanup_pods):
    """A cgroup holds every process of a container, whatever its process group: PySpark's daemon
    calls setpgid(0, 0), and its workers' memory still counts toward the executor container's
    limit. Here the main process stays small; a child in a group of its own (and its own child)
    allocates past the 64 MiB limit. The whole container is OOM-killed, both of them too, as
    with cgroup v2's memory.oom.group=1 (what the kubelet sets since Kubernetes 1.28)."""
    script = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setpgid(0, 0)\n"
        "    if os.fork() == 0:\n"
        "        print('grandchild', os.getpid(), flush=True)\n"
        "        time.sleep(600)\n"
        "    print('child', os.getpid(), flush=True)\n"
        "    b = []\n"
        "    for _ in range(40):\n"
        "        b.append(b'x' * (10 << 20))\n"
        "        time.sleep(0.05)\n"
        "    print('survived', flush=True)\n"
        "    time.sleep(600)\n"
        "time.sleep(600)\n"
    )
    name = uniq("oomtree")
    cleanup_pods.append(name)
    testbed.api.create_pod(pod_manifest(name, [sys.executable, "-c", script], PROCESS_NODE,
                                        memory_limit="64Mi"))
    pod = testbed.api.wait_pod(name, lambda p: phase(p) in ("Failed", "Succeeded"), 60, "to end")
    assert phase(pod) == "Failed"
    t = terminated(pod)
    assert t["reason"] == "OOMKilled", t
    assert t["exitCode"] == 137
    log = (process_kubelet.pod_dir(pod) / "main.log").read_text()
    assert "survived" not in log, log
    pids = {w: int(n) for w, n in (line.split() for line in log.splitlines()
                                   if line.startswith(("child ", "grandchild ")))}
    assert set(pids) == {"child", "grandchild"}, log
    wait_until(lambda: not any(alive(p) for p in pids.values()), 10, "the container's children to end")


@pytest.mark.parametrize("fault,reason,code", [("exit:42", "Error", 42), ("oom", "OOMKilled", 137)])
def test_injected_container_fault(testbed, process_kubelet, cleanup_pods, fault, reason, code):
    name = uniq("fault")
    pod = run_pod(testbed, cleanup_pods, pod_manifest(name, SLEEPER, PROCESS_NODE))
    pid = container_pid(pod)
    testbed.api.annotate_pod(name, FAULT, fault)
    pod = testbed.api.wait_pod(name, lambda p: phase(p) == "Failed", 30, "Failed")
    t = terminated(pod)
    assert t["reason"] == reason, t
    assert t["exitCode"] == code
    wait_until(lambda: not group_members(pid), 10, "the container processes to end")


def test_evict(testbed, process_kubelet, cleanup_pods):
    name = uniq("evict")
    pod = run_pod(testbed, cleanup_pods, pod_manifest(name, SLEEPER, PROCESS_NODE))
    pid = container_pid(pod)
    testbed.api.annotate_pod(name, FAULT, "evict")
    pod = testbed.api.wait_pod(name, lambda p: phase(p) == "Failed", 30, "Failed")
    assert pod["status"]["reason"] == "Evicted"
    assert condition(pod, "DisruptionTarget") == "True"
    wait_until(lambda: not group_members(pid), 10, "the container processes to end")


def test_image_pull_error(testbed, process_kubelet, cleanup_pods):
    name = uniq("pull")
    cleanup_pods.append(name)
    testbed.api.create_pod(pod_manifest(name, SLEEPER, PROCESS_NODE,
                                        image="registry.invalid/nonexistent:1"))

    def waiting(p):
        cs = (p.get("status") or {}).get("containerStatuses") or []
        return cs and (cs[0].get("state") or {}).get("waiting", {}).get("reason") == "ErrImagePull"
    pod = testbed.api.wait_pod(name, waiting, 30, "ErrImagePull")
    assert phase(pod) == "Pending"
    assert container_pid(pod) is None


def test_node_lost(testbed, kubelet_factory, cleanup_pods):
    api = testbed.api
    kubelet = kubelet_factory("lost-node")
    name = uniq("lost")
    pod = run_pod(testbed, cleanup_pods, pod_manifest(name, SLEEPER, kubelet.node))
    pid = container_pid(pod)
    assert group_members(pid)
    assert condition(pod, "Ready") == "True"

    kubelet.lose()
    # Its containers die at once; the kubelet itself keeps running but reports nothing.
    wait_until(lambda: not group_members(pid), 15, "the lost node's container processes to end")
    assert kubelet.proc.poll() is None
    # The node lifecycle controller notices the missing heartbeats (grace period 20 s).
    node = wait_until(lambda: (lambda n: n if condition(n, "Ready") == "Unknown" else None)(
        api.node(kubelet.node)), 90, "node Ready=Unknown", interval=1)
    taints = {t["key"] for t in node["spec"].get("taints") or []}
    assert "node.kubernetes.io/unreachable" in taints
    pod = api.wait_pod(name, lambda p: condition(p, "Ready") == "False", 60, "Ready=False")
    # Nobody reported the container's end: the last status the kubelet wrote still stands.
    assert terminated(pod) is None
    assert phase(pod) == "Running"


# ---- c. process-less mode ---------------------------------------------------------------------

def test_no_process_mode_500_pods(testbed, kubelet_factory, kubelet_root):
    n = 500
    kubelet = kubelet_factory("scale-node", mode="no-process", max_pods=n + 20)
    run = uniq("scale")
    pods = [
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": f"{run}-{i}", "labels": {"scale-run": run}},
         "spec": {"nodeSelector": {"kubernetes.io/hostname": kubelet.node},
                  "terminationGracePeriodSeconds": 30,
                  "containers": [{"name": "c", "image": "apache/spark:4.2.0",
                                  "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}}
        for i in range(n)
    ]
    api = testbed.api

    def count(pred):
        return sum(1 for p in api.pods(labelSelector=f"scale-run={run}") if pred(p))
    t0 = time.monotonic()
    try:
        testbed.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                               "items": pods}), timeout=300)
        created = time.monotonic()
        wait_until(lambda: count(running) == n, 300, f"{n} pods Running", interval=1)
        up = time.monotonic()
        items = api.pods(labelSelector=f"scale-run={run}")
        assert len(items) == n
        assert all(p["spec"]["nodeName"] == kubelet.node and p["status"]["podIP"] == "127.0.0.1"
                   for p in items)
        # No process: nothing was started for them.
        assert not processes_under(kubelet.work_dir)
        testbed.kubectl("delete", "pods", "-l", f"scale-run={run}", "--wait=false", timeout=300)
        wait_until(lambda: not api.pods(labelSelector=f"scale-run={run}"), 300,
                   f"{n} pods to be removed", interval=1)
        down = time.monotonic()
        print(f"\n[no-process] {n} pods: kubectl create {created - t0:.1f}s, all Running after "
              f"{up - t0:.1f}s, deleted and gone after {down - up:.1f}s more")
    finally:
        testbed.kubectl("delete", "pods", "-l", f"scale-run={run}", "--grace-period=0",
                        "--force", "--wait=false", timeout=300, check=False)


# ---- d. fidelity: Spark's own Kubernetes backend -------------------------------------------

def test_spark_builtin_k8s_backend_runs_shuffle(testbed, process_kubelet, tmp_path):
    api = testbed.api
    watch = api.watch("/api/v1/namespaces/default/pods", labelSelector="spark-role=executor")
    env = testbed.client_env()
    env["SPARK_LOCAL_IP"] = "127.0.0.1"
    env["PYSPARK_PYTHON"] = sys.executable
    env["PYSPARK_DRIVER_PYTHON"] = sys.executable
    env.pop("SPARK_HOME", None)
    out_path, log_path = tmp_path / "driver.out", tmp_path / "driver.log"
    confs = {
        "spark.kubernetes.container.image": "apache/spark:4.2.0",
        "spark.kubernetes.namespace": "default",
        # Only the process kubelet's node runs processes.
        "spark.kubernetes.node.selector.kubernetes.io/hostname": PROCESS_NODE,
    }
    args = [sys.executable, str(JOBS / "shuffle.py"), f"k8s://https://127.0.0.1:{testbed.port}",
            "--executors", "2"]
    for k, v in confs.items():
        args += ["--conf", f"{k}={v}"]
    proc = subprocess.Popen(args, stdout=open(out_path, "w"), stderr=open(log_path, "w"),
                            env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        raise AssertionError(f"driver did not finish in 300s:\n{log_path.read_text()[-6000:]}")
    assert code == 0, f"driver failed ({code}):\n{log_path.read_text()[-8000:]}"
    events = [json.loads(l) for l in out_path.read_text().splitlines() if l.startswith("{")]
    result = next(e for e in events if e["event"] == "result")
    [r] = result["results"]
    assert r["groups"] == 1000
    assert r["count"] == result["expected_count"]
    assert r["sum"] == result["expected_sum"]
    assert r["executors_alive"] == 2
    app_id = next(e for e in events if e["event"] == "started")["app_id"]

    # The executor pods: created by Spark, run by the process kubelet, deleted by Spark.
    seen = {}
    for _, o in watch.objects():
        seen[o["metadata"]["uid"]] = o
    assert len(seen) >= 2, f"executor pods seen: {[o['metadata']['name'] for o in seen.values()]}"
    for pod in seen.values():
        labels = pod["metadata"]["labels"]
        assert labels["spark-role"] == "executor"
        assert labels["spark-app-selector"] == app_id
        assert pod["spec"]["nodeName"] == PROCESS_NODE
        [c] = pod["spec"]["containers"]
        assert c["image"] == "apache/spark:4.2.0"
        log = process_kubelet.pod_dir(pod) / f"{c['name']}.log"
        assert log.exists(), f"no container log {log}"
        assert "KubernetesExecutorBackend" in log.read_text()
    ran = [o for _, o in watch.objects() if running(o)]
    assert {o["metadata"]["uid"] for o in ran} == set(seen)
    assert all(o["status"]["podIP"] == "127.0.0.1" for o in ran)
    wait_until(lambda: not api.pods(labelSelector="spark-role=executor"), 60,
               "the executor pods to be deleted")
    deleted = {o["metadata"]["uid"] for t, o in watch.objects() if t == "DELETED"}
    assert deleted == set(seen)
    wait_until(lambda: not [p for p in processes_under(process_kubelet.work_dir)
                            if "KubernetesExecutorBackend" in p[1]], 30, "executor JVMs to end")
    watch.close()


# ---- e. no leaks ------------------------------------------------------------------------------

def test_sigkilled_kubelet_leaves_no_processes(testbed, kubelet_factory, cleanup_pods):
    kubelet = kubelet_factory("leak-node")
    pids = []
    for i in range(2):
        pod = run_pod(testbed, cleanup_pods,
                      pod_manifest(uniq(f"leak{i}"), SLEEPER, kubelet.node))
        pids.append(container_pid(pod))
    assert all(group_members(p) for p in pids)
    assert len(processes_under(kubelet.work_dir)) >= 2
    kubelet.kill9()
    wait_until(lambda: not any(group_members(p) for p in pids), 15,
               "the container processes to die with the kubelet")
    assert not processes_under(kubelet.work_dir)


# ---- e2. a host of its own for each pod (--pod-hosts-file) ---------------------------------------

def test_pod_hosts_file_gives_each_pod_a_host_of_its_own(testbed, kubelet_factory, cleanup_pods, tmp_path):
    """Two kubelets with one --pod-hosts-file: the file starts with what the JDK needs of the
    machine (localhost and its host name), each pod's `127.0.0.1 <pod>.<namespace>.pod` is there
    before its container starts, the pod's IP stays 127.0.0.1, and the `apache/spark` image's
    executor role runs with that name as `--hostname`, `--bind-address 127.0.0.1` and the file as
    the JVM's hosts file (a stand-in `java` prints its arguments)."""
    api = testbed.api
    hosts = tmp_path / "pod-hosts"
    java_home = tmp_path / "java-home"
    (java_home / "bin").mkdir(parents=True)
    java = java_home / "bin" / "java"
    java.write_text('#!/bin/sh\nfor a in "$@"; do echo "arg $a"; done\n')
    java.chmod(0o755)
    kubelets = [kubelet_factory(f"hosts-{i}", pod_hosts_file=hosts, env={"JAVA_HOME": str(java_home)})
                for i in range(2)]
    # The kubelet sets HOSTNAME to the pod's name.
    look = f'grep -x "127.0.0.1 $HOSTNAME.default.pod" {hosts} && echo named'
    executor_env = [{"name": k, "value": v} for k, v in {
        "SPARK_DRIVER_URL": "spark://CoarseGrainedScheduler@127.0.0.1:1", "SPARK_EXECUTOR_ID": "1",
        "SPARK_EXECUTOR_CORES": "1", "SPARK_EXECUTOR_MEMORY": "512m", "SPARK_APPLICATION_ID": "spark-x",
    }.items()] + [
        {"name": "SPARK_EXECUTOR_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "SPARK_EXECUTOR_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    pods = {}
    for k in kubelets:
        plain = pod_manifest(uniq("named"), ["sh", "-c", look], k.node)
        executor = pod_manifest(uniq("exec"), None, k.node, image="apache/spark:4.2.0", env=executor_env)
        del executor["spec"]["containers"][0]["command"]
        executor["spec"]["containers"][0]["args"] = ["executor"]
        for m in (plain, executor):
            cleanup_pods.append(m["metadata"]["name"])
            api.create_pod(m)
            pods[m["metadata"]["name"]] = k
    done = {name: api.wait_pod(name, lambda p: phase(p) in ("Succeeded", "Failed"), 60, "ended")
            for name in pods}
    logs = {name: (pods[name].pod_dir(pod) / "main.log").read_text() for name, pod in done.items()}
    for name, pod in done.items():
        assert phase(pod) == "Succeeded", (name, logs[name])
        assert pod["status"]["podIP"] == "127.0.0.1", pod["status"]
        own = f"{name}.default.pod"
        if name.startswith("named"):
            assert logs[name].split() == ["127.0.0.1", own, "named"], logs[name]
            continue
        args = [line[4:] for line in logs[name].splitlines() if line.startswith("arg ")]

        def after(flag):
            return args[args.index(flag) + 1]
        assert f"-Djdk.net.hosts.file={hosts.resolve()}" in args, args
        assert (after("--hostname"), after("--bind-address"), after("--podName")) == (own, "127.0.0.1", name), args
    lines = hosts.read_text().splitlines()
    named = [line.split() for line in lines]
    for machine in ("localhost", socket.gethostname()):
        assert any(machine in n[1:] for n in named), (machine, lines)
    # Each pod once, after the machine's entries.
    own = [f"127.0.0.1 {name}.default.pod" for name in pods]
    assert sorted(line for line in lines if line.endswith(".pod")) == sorted(own), lines
    assert lines[-len(own):] == [line for line in lines if line in own], lines


# ---- f. persistent volume claims --------------------------------------------------------------

CLAIMS = "/api/v1/namespaces/default/persistentvolumeclaims"


def claim_manifest(name, storage_class, size="16Mi", volume=None):
    spec = {"accessModes": ["ReadWriteOnce"], "storageClassName": storage_class,
            "resources": {"requests": {"storage": size}}}
    if volume:
        spec["volumeName"] = volume
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name}, "spec": spec}


def bound_claim(api, name, timeout=60):
    def check():
        c = api.get_opt(f"{CLAIMS}/{name}")
        return c if c and (c.get("status") or {}).get("phase") == "Bound" else None
    return wait_until(check, timeout, f"claim {name} to be Bound")


def waiting(pod):
    """The waiting state of the pod's container, or {}."""
    cs = (pod.get("status") or {}).get("containerStatuses") or []
    return (cs[0].get("state") or {}).get("waiting") or {} if cs else {}


def test_claim_is_provisioned_mounted_and_outlives_its_pods(testbed, process_kubelet, hostpath_storage_class,
                                                            cleanup_pods):
    """A claim of the host-path StorageClass gets a PV under /tmp/hostpath_pv; a pod mounts it
    at /data/spark-x/executor-x (as Spark mounts a local-dir claim) and writes a block file; the
    next pod with the same claim finds it the way Spark's KubernetesLocalDiskShuffleDataIO
    recovers shuffle files: two parents up from SPARK_LOCAL_DIRS, then
    spark-*/*/blockmgr-*/*/*. Deleting the claim deletes the PV and its folder."""
    api = testbed.api
    claim = uniq("claim")
    mount = "/data/spark-x/executor-x"
    api.create(CLAIMS, claim_manifest(claim, hostpath_storage_class))
    try:
        pvc = bound_claim(api, claim)
        pv_name = pvc["spec"]["volumeName"]
        pv = api.get(f"/api/v1/persistentvolumes/{pv_name}")
        host_dir = Path(pv["spec"]["hostPath"]["path"])
        assert host_dir.parent == Path("/tmp/hostpath_pv") and host_dir.is_dir(), host_dir
        volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]
        mounts = [{"name": "data", "mountPath": mount}]
        # The kubelet rewrites container paths in the environment, as SPARK_LOCAL_DIRS is.
        env = [{"name": "LOCAL_DIRS", "value": mount}]

        def run_to_success(name, script):
            """Runs `script` in a pod that mounts the claim; the pod once it ended, and its log."""
            api.create_pod(pod_manifest(name, ["sh", "-c", script], PROCESS_NODE, env=env, volumes=volumes,
                                        mounts=mounts))
            pod = api.wait_pod(name, lambda p: phase(p) in ("Succeeded", "Failed"), 60, "to end")
            log = (process_kubelet.pod_dir(pod) / "main.log").read_text()
            assert phase(pod) == "Succeeded", log
            return pod, log

        writer = uniq("pvc-writer")
        cleanup_pods.append(writer)
        write = ("mkdir -p $LOCAL_DIRS/blockmgr-1/0c && "
                 "echo shuffle-data > $LOCAL_DIRS/blockmgr-1/0c/shuffle_0_0_0.data && echo written")
        pod, log = run_to_success(writer, write)
        # The mount path is a link to the PV's folder, below real folders of the pod.
        link = process_kubelet.pod_dir(pod) / "root" / mount.lstrip("/")
        assert link.is_symlink() and os.readlink(link) == str(host_dir), link
        assert link.parent.is_dir() and not link.parent.is_symlink()
        assert (host_dir / "blockmgr-1" / "0c" / "shuffle_0_0_0.data").read_text() == "shuffle-data\n"
        api.delete_pod(writer)
        api.wait_pod_gone(writer, 60)

        reader = uniq("pvc-reader")
        cleanup_pods.append(reader)
        read = ("top=$(dirname $(dirname $LOCAL_DIRS)); echo \"top: $(ls $top)\"; "
                "echo \"parent: $(ls $(dirname $LOCAL_DIRS))\"; "
                "for f in $top/spark-*/*/blockmgr-*/*/*; do echo \"found ${f#$top/}: $(cat $f)\"; done")
        pod, log = run_to_success(reader, read)
        assert "top: spark-x\n" in log, log
        assert "parent: executor-x\n" in log, log
        assert "found spark-x/executor-x/blockmgr-1/0c/shuffle_0_0_0.data: shuffle-data\n" in log, log
        api.delete_pod(reader)
        api.wait_pod_gone(reader, 60)

        api.delete(f"{CLAIMS}/{claim}")
        wait_until(lambda: api.get_opt(f"{CLAIMS}/{claim}") is None, 60, "the claim to be removed")
        wait_until(lambda: api.get_opt(f"/api/v1/persistentvolumes/{pv_name}") is None, 60,
                   f"PV {pv_name} to be deleted with its claim")
        wait_until(lambda: not host_dir.exists(), 30, f"{host_dir} to be removed")
    finally:
        api.delete(f"{CLAIMS}/{claim}")


def test_a_claim_that_is_missing_unbound_or_not_hostpath_is_named(testbed, process_kubelet, kubelet_factory,
                                                                  cleanup_pods):
    """Through the scheduler a pod whose claim does not exist is never scheduled (the scheduler
    says why, naming the claim); so the kubelet's own handling is seen with pods bound to its
    node directly (spec.nodeName), on a kubelet that gives claims 4 s to be bound: it reports
    the container waiting (ContainerCreating) for the claim, then CreateContainerConfigError
    naming it; a claim bound to a PV that is not hostPath fails at once."""
    api = testbed.api
    missing = uniq("no-claim")
    scheduled = uniq("pvc-sched")
    cleanup_pods.append(scheduled)
    api.create_pod(pod_manifest(scheduled, SLEEPER, PROCESS_NODE,
                                volumes=[{"name": "d", "persistentVolumeClaim": {"claimName": missing}}],
                                mounts=[{"name": "d", "mountPath": "/d"}]))

    def unschedulable(p):
        return any(c["type"] == "PodScheduled" and c["status"] == "False"
                   and f'persistentvolumeclaim "{missing}" not found' in c.get("message", "")
                   for c in (p.get("status") or {}).get("conditions") or [])
    api.wait_pod(scheduled, unschedulable, 30, "unschedulable, naming the claim")

    kubelet = kubelet_factory("claim-node", extra=("--claim-wait-secs", "4"))
    unbound = uniq("unbound")
    static_claim, static_pv = uniq("nfs-claim"), uniq("nfs-pv")
    api.create(CLAIMS, claim_manifest(unbound, "stoker-e2e-none"))
    api.create("/api/v1/persistentvolumes", {
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": static_pv},
        "spec": {"capacity": {"storage": "16Mi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "",
                 "persistentVolumeReclaimPolicy": "Retain", "nfs": {"server": "127.0.0.1", "path": "/nowhere"}}})
    api.create(CLAIMS, claim_manifest(static_claim, "", volume=static_pv))
    try:
        bound_claim(api, static_claim)
        pods = {}
        for claim in (missing, unbound, static_claim):
            name = uniq("pvc-direct")
            manifest = pod_manifest(name, SLEEPER, kubelet.node,
                                    volumes=[{"name": "d", "persistentVolumeClaim": {"claimName": claim}}],
                                    mounts=[{"name": "d", "mountPath": "/d"}])
            del manifest["spec"]["nodeSelector"]
            manifest["spec"]["nodeName"] = kubelet.node
            cleanup_pods.append(name)
            pods[claim] = (name, api.watch("/api/v1/namespaces/default/pods",
                                           fieldSelector=f"metadata.name={name}"))
            api.create_pod(manifest)
        for claim, why in ((missing, "not found"), (unbound, "it is Pending")):
            name, watch = pods[claim]
            watch.wait_for(lambda t, o: waiting(o).get("reason") == "ContainerCreating"
                           and waiting(o).get("message") == f'waiting for persistentvolumeclaim "{claim}" '
                                                            f"to be bound: {why}",
                           30, f"{name} waiting for claim {claim}")
            _, pod = watch.wait_for(lambda t, o: waiting(o).get("reason") == "CreateContainerConfigError",
                                    30, f"{name}: CreateContainerConfigError")
            assert waiting(pod)["message"] == (f'persistentvolumeclaim "{claim}" (namespace default) is not bound '
                                               f"after 4 s: {why}"), waiting(pod)
            assert phase(pod) == "Pending" and container_pid(pod) is None
        name, watch = pods[static_claim]
        _, pod = watch.wait_for(lambda t, o: waiting(o).get("reason") == "CreateContainerConfigError",
                                30, f"{name}: CreateContainerConfigError")
        assert waiting(pod)["message"] == (
            f'persistentvolumeclaim "{static_claim}" is bound to persistentvolume "{static_pv}", which is not '
            "a hostPath volume: the test-bed kubelet mounts only hostPath persistent volumes"), waiting(pod)
        for _, watch in pods.values():
            watch.close()
    finally:
        for claim in (unbound, static_claim):
            api.delete(f"{CLAIMS}/{claim}")
        api.delete(f"/api/v1/persistentvolumes/{static_pv}")
