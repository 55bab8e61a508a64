"""Fair share on the Kubernetes test bed: a reclaim decommissions executor pods through the
driver, and stoker deletes them once their executors have left (real Spark drivers, real
executor JVMs run by the process kubelet)."""
import os

import pytest

from conftest import (
    ASKED_FOR_2,
    DECOMMISSIONING,
    QUEUES_FOUR_EXECUTORS,
    check_given_back_outputs_migrated,
    driver_hosts_file_args,
    executors_given_back,
    wait_until,
)
from test_kubernetes import (  # noqa: F401  (fixtures: the autouse token one, kube)
    _driver_tokens,
    check_result,
    kube,
    k8s_args,
    pods_of,
    running_pods,
    selector,
)
from testbed import pod_host_name


@pytest.mark.long
def test_fair_share_reclaim_decommissions_executor_pods_and_stoker_deletes_them(
        kube, testbed, process_node_cordoned, kubelet_factory, driver_factory, work_dir):
    """Capacity 4, A (dynamic allocation, a long backlog) holds 4 executor pods; B (2 static
    executors) arrives, A is asked once to give 2 back and decommissions 2 busy executors, which
    finish their task, migrate their map outputs and exit 0 by themselves; stoker deletes their
    pods, nothing is removed by force, both answers are right. Every executor has a host of its
    own (one kubelet with a pod hosts file, which the drivers resolve names with too; the
    session's node is cordoned), as pods with IPs of their own on a cluster: Spark counts the
    migrated outputs as available (its same-host rule, TaskSetManager.executorLost), so nothing
    is recomputed."""
    hosts = work_dir / "pod-hosts"
    node = kubelet_factory(f"fair-{os.getpid()}", pod_hosts_file=hosts)
    queue_file = work_dir / "queues.toml"
    queue_file.write_text(QUEUES_FOUR_EXECUTORS)
    kube.stop()
    kube.extra = ["--queues", str(queue_file)]
    kube.start()
    watch = testbed.api.watch("/api/v1/pods", labelSelector=selector(kube.instance))

    # A: dynamic allocation with a backlog long enough to keep its 4 executor pods busy.
    a = driver_factory(kube, "--dynamic", "--executors", "8", "--slow-ms", "1500", "--partitions", "160",
                       *k8s_args("default", *DECOMMISSIONING), *driver_hosts_file_args(hosts))
    app_a = a.wait_event("started", timeout=180)["app_id"]
    a.wait_event("job-start", timeout=120)

    def executor_log(pod):
        return "".join(p.read_text() for p in node.pod_dir(pod).glob("*.log"))

    def registered_pods():
        pods = running_pods(testbed, kube.instance, app_a)
        ready = [p for p in pods if "Successfully registered with driver" in executor_log(p)]
        return ready if len(ready) >= 4 else None
    pods_a = {p["metadata"]["labels"]["spark-exec-id"]: p
              for p in wait_until(registered_pods, 240, "A's 4 executor pods registered with its driver")}

    # B arrives: A is asked once to give 2 back and decommissions 2 of its (busy) executors.
    b = driver_factory(kube, "--executors", "2", "--slow-ms", "200", "--partitions", "8", *k8s_args(),
                       *driver_hosts_file_args(hosts))
    app_b = b.wait_event("started", timeout=180)["app_id"]
    wait_until(lambda: ASKED_FOR_2.search(a.log()), 120, "A asked to give back 2 executors")
    given = wait_until(lambda: executors_given_back(a.log()), 60, "A gives back 2 executors of its choice")
    assert len(given) == 2 and all(how == "decommissioning" for _, how in given), given
    given = [executor for executor, _ in given]
    gone = {pods_a[e]["metadata"]["name"] for e in given}
    for executor in given:
        wait_until(lambda: f"Decommission executor {executor}." in executor_log(pods_a[executor]), 60,
                   f"executor {executor} decommissioning")
    # Their executors leave by themselves (tasks finished, blocks migrated) and stoker deletes
    # their pods: within the reclaim deadline, nothing removed by force.
    wait_until(lambda: not gone & {p["metadata"]["name"] for p in pods_of(testbed, kube.instance, app_a)},
               120, "the 2 given-back pods deleted")
    logs = [executor_log(pods_a[e]) for e in given]

    check_result(b.wait(timeout=400))
    result_a = a.wait(timeout=600)
    check_result(result_a)
    events = watch.objects()
    watch.close()
    added = [o for t, o in events if t == "ADDED"]

    log_a = a.log()
    assert len(ASKED_FOR_2.findall(log_a)) == 1, ASKED_FOR_2.findall(log_a)
    assert "RECLAIMED" not in log_a and "not given back" not in log_a, log_a[-8000:]
    # The given-back executors' containers ended by themselves (exit 0: "Finished
    # decommissioning"), not killed by a deletion.
    def exit_codes(name):
        return {s["state"]["terminated"]["exitCode"]
                for _, o in events if o["metadata"]["name"] == name
                for s in (o.get("status") or {}).get("containerStatuses") or []
                if (s.get("state") or {}).get("terminated")}
    assert all(exit_codes(name) == {0} for name in gone), {name: exit_codes(name) for name in gone}
    # B's 2 pods were created; A's pods: its 4, and after B ended at most 2 more (share back to 4).
    by_app = {}
    for o in added:
        by_app.setdefault(o["metadata"]["labels"]["spark-app-selector"], set()).add(o["metadata"]["name"])
    assert len(by_app.get(app_b, ())) == 2, by_app
    assert 4 <= len(by_app.get(app_a, ())) <= 6, by_app
    # Each ran on the test's node with a host of its own.
    assert {o["spec"].get("nodeName") for _, o in events if o["spec"].get("nodeName")} == {node.node}, events
    for e, p in pods_a.items():
        assert f"Starting executor ID {e} on host {pod_host_name(p)}\n" in executor_log(p), executor_log(p)[-4000:]
    # Every map output written on the given-back executors moved to another host before they
    # left: no task ran again.
    finished, migrated, reruns = check_given_back_outputs_migrated(logs, result_a)
    print(f"reclaim on pods: A gave back executors {given}; map outputs on them {finished}, migrated "
          f"{migrated}; task re-runs A={reruns}; pods created A={len(by_app[app_a])} B={len(by_app[app_b])}")
