"""A node drain on the Kubernetes test bed: `kubectl drain` evicts executor pods through the
eviction API, the process kubelet runs their `preStop` hook (Spark's `/opt/decom.sh` under
spark.decommission.enabled=true), and the executors decommission: their blocks migrate, they
leave by themselves, stoker reports them and starts replacements on the node that is left."""
import os
import re
import threading
import time

from conftest import (
    DECOMMISSIONING,
    check_given_back_outputs_migrated,
    driver_hosts_file_args,
    wait_until,
)
from test_kubernetes import (  # noqa: F401  (fixtures: the autouse token one, kube)
    _driver_tokens,
    check_result,
    k8s_args,
    kube,
    pods_of,
    running_pods,
    selector,
)
from testbed import pod_host_name, pod_manifest, terminated


# A map output an executor writes after its decommissioning began (the task that was running)
# migrates in the next round of BlockManagerDecommissioner, which waits
# spark.storage.decommission.replicationReattemptInterval between rounds: 30 s by default, as long
# as the pod's default grace period (30 s), so that executor would be SIGTERMed first (exit 143;
# seen on this bed). 2 s lets it leave by itself well within the grace period.
MIGRATION_ROUNDS = ["--conf", "spark.storage.decommission.replicationReattemptInterval=2s"]


def test_prestop_exec_hooks_run_before_sigterm_within_the_grace_period(testbed, process_kubelet):
    """The kubelet's order on a graceful deletion, for plain exec hooks: the hook runs (with the
    container's environment, in its working directory), SIGTERM once it returns; a hook that
    cannot run is logged and SIGTERM follows at once; a hook that outlasts the grace period is
    left behind: SIGTERM at its end, SIGKILL 2 s later (the kubelet's minimum after a hook)."""
    api = testbed.api
    suffix = os.getpid()
    polite = 'trap "echo TERM >> events; exit 0" TERM; echo started >> events; while true; do sleep 0.2; done'
    stubborn = 'trap "echo TERM >> events" TERM; echo started >> events; while true; do sleep 0.2; done'
    cases = {
        f"hook-ok-{suffix}": (polite, ["sh", "-c", "echo hook $HOOK_VAR >> events; sleep 1; echo hook-end >> events"], 30),
        f"hook-bad-{suffix}": (polite, ["/nonexistent/prestop"], 30),
        f"hook-slow-{suffix}": (stubborn, ["sh", "-c", "echo hook >> events; sleep 60"], 3),
    }
    pods = {}
    for name, (command, hook, grace) in cases.items():
        manifest = pod_manifest(name, ["sh", "-c", command], process_kubelet.node, grace=grace,
                                env=[{"name": "HOOK_VAR", "value": "from-env"}])
        manifest["spec"]["containers"][0]["lifecycle"] = {"preStop": {"exec": {"command": hook}}}
        pods[name] = api.create_pod(manifest)
    watch = api.watch("/api/v1/namespaces/default/pods")
    events = {name: process_kubelet.pod_dir(pod) / "events" for name, pod in pods.items()}
    for name in cases:
        wait_until(lambda: events[name].exists() and "started" in events[name].read_text(), 60,
                   f"{name} running")
    took = {}
    try:
        started = time.monotonic()
        for name in cases:
            api.delete_pod(name)
        for name in cases:
            api.wait_pod_gone(name, 60)
            took[name] = time.monotonic() - started
    finally:
        for name in cases:
            api.delete_pod(name, force=True)
    lines = {name: path.read_text().split() for name, path in events.items()}
    ok, bad, slow = cases
    assert " ".join(lines[ok]) == "started hook from-env hook-end TERM", lines[ok]
    assert lines[bad] == ["started", "TERM"], lines[bad]
    assert lines[slow] == ["started", "hook", "TERM"], lines[slow]
    log = process_kubelet.log()
    assert re.search(rf"{bad}.*FailedPreStopHook", log), log[-3000:]
    assert re.search(rf"{slow}.*preStop hook not completed in the grace period", log), log[-3000:]

    def exit_code(name):
        codes = [terminated(o)["exitCode"] for _, o in watch.objects(name) if terminated(o)]
        return codes[-1] if codes else None
    watch.close()
    # The polite ones exit 0 on SIGTERM; the stubborn one is SIGKILLed (3 s + 2 s).
    assert (exit_code(ok), exit_code(bad), exit_code(slow)) == (0, 0, 137)
    assert took[bad] < 10 and 1 <= took[ok] < 15 and 5 <= took[slow] < 20, took
    print(f"preStop exec hooks: pods gone after {({k.rsplit('-', 1)[0]: round(v, 1) for k, v in took.items()})} s")


def test_a_node_drain_decommissions_its_executors_and_they_are_replaced(kube, testbed, process_node_cordoned,
                                                                      kubelet_factory, driver_factory, tmp_path):
    """`kubectl drain` of a node during a job (spark.decommission.enabled and block migration on):
    the eviction deletes its executor pods with their grace period, the kubelet runs the
    containers' preStop hook (`/opt/decom.sh`: SIGPWR to the executor JVM, wait for it to exit),
    the executors decommission (running tasks finish, shuffle blocks migrate to the executors on
    the other node) and exit 0 by themselves before any SIGTERM; stoker reports them to the
    driver (DELETED_EXTERNALLY: someone else deleted the pods) and creates replacements, which
    run on the other node (the drained one is cordoned); the answer is right and no pod is left.
    Migration rounds are 2 s apart instead of 30 s (MIGRATION_ROUNDS): with Spark's default an
    output written after the SIGPWR would wait out the 30 s grace period.

    Hosts: as on a cluster, where pods have IPs of their own, every executor has a host of its
    own: both kubelets of the test run with one pod hosts file (`127.0.0.1 <pod>.<ns>.pod` for
    each pod; executors advertise that name and bind 127.0.0.1), which the executor JVMs and the
    driver's resolve names with. The session's node, whose executors all have host 127.0.0.1, is
    cordoned throughout.

    Placement: node B holds at most 2 pods, and node A is cordoned until B holds 2 executors; so
    exactly 2 of the 4 executors are on B, 2 on A, whatever the scheduler's scoring (it would
    spread 4 pods over two empty equal nodes anyway, but nothing would make sure of it).

    Nothing is recomputed: Spark re-runs a map task that finished on a decommissioned executor
    while its stage still runs unless its output moved to another *host*
    (TaskSetManager.executorLost); every output written on B migrated to an executor on A, whose
    host is another, so no task runs again."""
    api = testbed.api
    hosts = tmp_path / "pod-hosts"
    a = kubelet_factory(f"drain-a-{os.getpid()}", pod_hosts_file=hosts)
    b = kubelet_factory(f"drain-b-{os.getpid()}", max_pods=2, pod_hosts_file=hosts)
    kubelets = {a.node: a, b.node: b}
    watch = api.watch("/api/v1/pods", labelSelector=selector(kube.instance))
    testbed.kubectl("cordon", a.node)
    try:
        driver = driver_factory(kube, "--executors", "4", "--partitions", "60", "--slow-ms", "2000",
                                *k8s_args("default", *DECOMMISSIONING, *MIGRATION_ROUNDS),
                                *driver_hosts_file_args(hosts))
        app_id = driver.wait_event("started", timeout=180)["app_id"]

        def on(node):
            return [p for p in pods_of(testbed, kube.instance, app_id)
                    if (p.get("spec") or {}).get("nodeName") == node]
        wait_until(lambda: len(on(b.node)) == 2, 120, f"2 executor pods bound to {b.node}")
    finally:
        testbed.kubectl("uncordon", a.node)

    def executor_log(pod, kubelet):
        return "".join(p.read_text() for p in kubelet.pod_dir(pod).glob("*.log"))

    def registered():
        pods = running_pods(testbed, kube.instance, app_id)
        if len(pods) < 4:
            return None
        ready = [p for p in pods
                 if "Successfully registered with driver" in executor_log(p, kubelets[p["spec"]["nodeName"]])]
        return ready if len(ready) == 4 else None
    first = {p["metadata"]["labels"]["spark-exec-id"]: p for p in wait_until(registered, 240, "4 executors registered")}
    placement = {i: p["spec"]["nodeName"] for i, p in first.items()}
    drained = sorted(i for i, n in placement.items() if n == b.node)
    assert len(drained) == 2 and sum(n == a.node for n in placement.values()) == 2, placement
    # Each executor has its pod's own host; the pod's IP is still 127.0.0.1.
    for i, p in first.items():
        assert p["status"]["podIP"] == "127.0.0.1", p["status"]
        log = executor_log(p, kubelets[placement[i]])
        assert f"Starting executor ID {i} on host {pod_host_name(p)}\n" in log, log[-4000:]
    named = {line.split()[-1] for line in hosts.read_text().splitlines() if line.startswith("127.0.0.1 ")}
    assert {pod_host_name(p) for p in first.values()} <= named, hosts.read_text()
    driver.wait_event("job-start", timeout=120)

    # Mid-map-stage: each of B's executors has written map output.
    def map_outputs(i):
        return len(re.findall(r"Finished task \d+\.\d+ in stage 0\.0", executor_log(first[i], b)))
    wait_until(lambda: all(map_outputs(i) >= 1 for i in drained), 180, "map output on both of B's executors")
    before = {i: map_outputs(i) for i in drained}
    # kubectl drain returns once the evicted pods are gone; the replacements are awaited meanwhile.
    drain = {}

    def run_drain():
        drain["out"] = testbed.kubectl("drain", b.node, "--ignore-daemonsets", "--delete-emptydir-data", "--force",
                                       "--pod-selector=spark-role=executor", "--timeout=120s", timeout=180,
                                       check=False)
        drain["s"] = time.monotonic() - t0
    t0 = time.monotonic()
    drainer = threading.Thread(target=run_drain, daemon=True)
    drainer.start()

    def replacements():
        return {o["metadata"]["labels"]["spark-exec-id"]: o for t, o in watch.objects()
                if t == "ADDED" and o["metadata"]["labels"]["spark-exec-id"] not in first}

    def replacements_running():
        pods = [p for p in running_pods(testbed, kube.instance, app_id)
                if p["metadata"]["labels"]["spark-exec-id"] not in first]
        return pods if len(pods) >= len(drained) else None
    replaced = wait_until(replacements_running, 180, "replacement executor pods running")
    replaced_s = time.monotonic() - t0
    assert {p["spec"]["nodeName"] for p in replaced} == {a.node}, replaced
    for p in replaced:
        wait_until(lambda: "Successfully registered with driver" in executor_log(p, a), 120,
                   f"replacement {p['metadata']['name']} registered")
    registered_s = time.monotonic() - t0
    drainer.join(timeout=200)
    out = drain["out"]
    assert out.returncode == 0, out
    for i in drained:
        assert f"evicting pod default/{first[i]['metadata']['name']}" in out.stdout + out.stderr, out
    drain_s = drain["s"]

    result = driver.wait(timeout=600)
    check_result(result)
    events = watch.objects()
    watch.close()

    logs = {i: executor_log(first[i], b) for i in drained}
    for i, p in first.items():
        # Their block managers (whose blocks the others fetch and receive) had that host too.
        log = executor_log(p, kubelets[placement[i]])
        assert f"BlockManagerId({i}, {pod_host_name(p)}, " in log, log[-4000:]
    for i in drained:
        # The preStop hook's SIGPWR started the executor's own decommissioning.
        assert f"Decommission executor {i}." in logs[i], logs[i][-4000:]
    blog = b.log()
    for i in drained:
        name = first[i]["metadata"]["name"]
        assert re.search(rf"{name}.*preStop hook: SIGPWR to the executor JVM", blog), blog[-4000:]
        assert re.search(rf"{name}.*preStop hook done: the main process exited", blog), blog[-4000:]
        assert not re.search(rf"{name}.*(grace period|SIGKILL)", blog), blog[-4000:]

    # Their containers ended by themselves (exit 0 after decommissioning), not by SIGTERM (143)
    # or SIGKILL (137).
    def exit_codes(name):
        return {s["state"]["terminated"]["exitCode"]
                for _, o in events if o["metadata"]["name"] == name
                for s in (o.get("status") or {}).get("containerStatuses") or []
                if (s.get("state") or {}).get("terminated")}
    codes = {i: exit_codes(first[i]["metadata"]["name"]) for i in drained}
    assert all(c == {0} for c in codes.values()), codes
    # The driver heard of their decommissioning from the executors themselves, and stoker
    # reported their end (someone else deleted the pods; the driver logs that at INFO).
    log, stoker_log = driver.log(), kube.log_path.read_text()
    for i in drained:
        assert f"Received executor {i} decommissioned message" in log, log[-6000:]
        assert re.search(rf"executor pod ended app={app_id} executor={i} reason=DELETED_EXTERNALLY "
                         r".*the executor exited with code 0\b", stoker_log), stoker_log[-6000:]
    # Every pod created after the first four (the replacements) ran on A.
    added = replacements()
    nodes = {i: [o for _, o in events if o["metadata"]["name"] == p["metadata"]["name"]][-1]["spec"].get("nodeName")
             for i, p in added.items()}
    assert len(added) >= len(drained) and set(nodes.values()) == {a.node}, nodes
    # Every map output written on B moved to another host before its executors left: no task ran
    # again.
    finished, migrated, reruns = check_given_back_outputs_migrated(list(logs.values()), result)
    print(f"drain of {b.node}: executors drained {drained} (map outputs before the drain {before}); "
          f"map outputs written there {finished}, shuffle blocks migrated {migrated}; map tasks re-run {reruns}; "
          f"kubectl drain took {drain_s:.1f} s; replacements {sorted(added)} running on {a.node} "
          f"{replaced_s:.1f} s after the drain began (Spark asks for them as soon as its executors "
          f"decommission), registered {registered_s:.1f} s after it")
