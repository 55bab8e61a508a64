"""Issue 12, item 5: one stoker tracking APPS x PER executor pods (default 100 x 100 = 10,000) on the
test bed's process-less kubelet, one forced re-list under that load, and stoker's memory and CPU.

Real Spark drivers are too heavy for 100 at once on a 2-core machine, so the applications are
driven by a light protocol client in this process (grpcio, the stubs tests/e2e/grpc_client.py
generates from proto/): per application RegisterApplication (a minimal executor template pinned to
the process-less node), RequestTotalExecutors PER, a WatchExecutors stream read by a thread of its
own, and heartbeats every 2 s (lease 10 s); one gRPC channel per application (stoker allows 100
HTTP/2 streams per connection).

The pieces are chaos.py's (tests/chaos): its test bed (the API server without a pods watch cache,
so a resumed watch goes to etcd), its stoker (--auth none, loopback; kubeconfig through the
FaultProxy; --kube-qps 0 here, as the ramp benchmark runs it), its ground-truth PodWatch (straight to the
API server) and its re-list fault (case c): stoker cut off by the proxy, a ConfigMap written,
etcd compacted, stoker's connections reset, the proxy healed: the watch's resume gets 410 Gone and
kube-runtime's watcher lists all pods again. While stoker is cut off, one executor pod is
force-deleted: the re-list is the only way stoker can learn it, so the time from the fault to
that executor's EXITED event on its application's stream (and to its replacement Running) is
when stoker has caught up. CPU snapshots and the machine line come from bench_k8s.py.

Loss checks (all must be 0): pods deleted that no application asked for (any pod deletion
before the unregister, except the victim); executor ids with more than one pod; EXITED events on
the streams other than the victim's (DELETED_EXTERNALLY).

Usage: bench_scale.py --out DIR [--apps 100] [--per 100] [--again]
(--again: then a second ramp and unregister of as many new applications, without a fault: is the
memory left after the first cycle reused, or does it grow?)
Writes DIR/scale.md (the table) and DIR/scale-samples.json; prints the table.
"""
import argparse
import datetime
import json
import os
import re
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests" / "chaos"))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from bench_k8s import cpu_delta, cpu_snapshot, machine  # noqa: E402
import chaos  # noqa: E402
from chaos import NODE, ChaosStoker, FaultProxy, Harness, PodWatch, log  # noqa: E402

import grpc  # noqa: E402
from grpc_client import _rpc, pb  # noqa: E402

NS = "scale"
HEARTBEAT_S = 2.0
RELIST_MARKER = "pod watch: listing pods"


# ---- stoker's process figures from /proc -------------------------------------------------------

def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssPeak:
    """Samples stoker's RSS every 50 ms between start() and stop()."""

    def __init__(self, pid):
        self.pid, self.peak, self.done = pid, 0.0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.done.wait(0.05):
            try:
                self.peak = max(self.peak, rss_mib(self.pid))
            except OSError:
                return

    def stop(self):
        self.done.set()
        self.thread.join(timeout=5)
        return self.peak


# ---- the light drivers -------------------------------------------------------------------------

class App:
    """One application: its own channel, a watch stream read by a thread, EXECUTOR events kept."""

    def __init__(self, port, i, per, prefix="scale", namespace=NS, node=NODE):
        self.app_id = f"{prefix}-{i:03d}"
        self.per = per
        self.namespace, self.node = namespace, node
        # A channel of its own (no shared subchannel): 100 watch streams on one HTTP/2 connection
        # would reach stoker's --max-streams-per-connection and queue every other call.
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        self.stub = _rpc.ExecutorAllocatorStub(self.channel)
        self.lock = threading.Lock()
        self.events = []  # (monotonic t, executor id, state name, reason name)
        self.last_seq = 0
        self.stream = None
        self.stream_error = None
        self.token = None

    def register(self):
        req = pb.RegisterApplicationRequest(
            app_id=self.app_id, app_name="bench-scale",
            template=pb.ExecutorTemplate(
                driver_url="spark://CoarseGrainedScheduler@127.0.0.1:40000", spark_version="4.2.0",
                spark_user="bench", profiles=[pb.ResourceProfile(id=0, cores=1, heap_mib=512, overhead_mib=384)],
                kubernetes=pb.KubernetesSettings(namespace=self.namespace,
                                                 node_selector={"kubernetes.io/hostname": self.node})),
            initial_targets=[pb.ProfileTarget(resource_profile_id=0, total=0)])
        self.token = self.stub.RegisterApplication(req, timeout=30).token
        self.stream = self.stub.WatchExecutors(pb.WatchExecutorsRequest(app_id=self.app_id, token=self.token))
        threading.Thread(target=self._read, daemon=True, name=f"watch-{self.app_id}").start()

    def _read(self):
        try:
            for ev in self.stream:
                t = time.monotonic()
                with self.lock:
                    self.last_seq = max(self.last_seq, ev.seq)
                    if ev.WhichOneof("kind") == "executor":
                        e = ev.executor
                        self.events.append((t, e.executor_id, pb.ExecutorState.Name(e.state),
                                            pb.ExitReason.Name(e.reason)))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self.stream_error = repr(e)[:200]

    def request(self, total):
        self.stub.RequestTotalExecutors(pb.RequestTotalExecutorsRequest(
            app_id=self.app_id, token=self.token, targets=[pb.ProfileTarget(resource_profile_id=0, total=total)]),
            timeout=30)

    def heartbeat(self):
        with self.lock:
            acked = self.last_seq
        self.stub.Heartbeat(pb.HeartbeatRequest(app_id=self.app_id, token=self.token, acked_seq=acked), timeout=5)

    def unregister(self):
        self.stub.UnregisterApplication(pb.UnregisterApplicationRequest(app_id=self.app_id, token=self.token),
                                        timeout=60)

    def snapshot(self):
        with self.lock:
            return list(self.events)

    def running(self):
        """Executor ids whose last event is RUNNING."""
        last = {}
        for _, eid, state, _ in self.snapshot():
            last[eid] = state
        return {eid for eid, s in last.items() if s == "EXECUTOR_STATE_RUNNING"}

    def exited(self):
        return [(t, eid, reason) for t, eid, state, reason in self.snapshot() if state == "EXECUTOR_STATE_EXITED"]

    def close(self):
        if self.stream is not None:
            self.stream.cancel()
        self.channel.close()


class Heartbeats:
    """One thread heartbeating every application every HEARTBEAT_S (lease 10 s); failures counted."""

    def __init__(self, apps):
        self.apps, self.done, self.failures = apps, threading.Event(), []
        self.thread = threading.Thread(target=self._run, daemon=True, name="heartbeats")
        self.thread.start()

    def _run(self):
        while not self.done.wait(HEARTBEAT_S):
            for a in list(self.apps):
                if self.done.is_set():
                    return
                try:
                    a.heartbeat()
                except grpc.RpcError as e:
                    self.failures.append(f"{a.app_id}: {e.code()}")

    def stop(self):
        self.done.set()
        self.thread.join(timeout=30)


# ---- the run -----------------------------------------------------------------------------------

def wait_for(pred, timeout, what, interval=0.5):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pod_times(watch):
    """{uid: (app, exec id, first ADDED t, first Running t or None)} from the ground-truth watch."""
    out = {}
    for t, typ, uid, app, eid, phase, deleting in watch.snapshot():
        rec = out.setdefault(uid, [app, eid, None, None])
        if typ == "ADDED" and rec[2] is None:
            rec[2] = t
        if phase == "Running" and not deleting and typ != "DELETED" and rec[3] is None:
            rec[3] = t
    return out


def deletions(watch, before=None, except_uid=None):
    """Pods whose deletion began (deletionTimestamp or DELETED) before monotonic `before`."""
    return sorted({uid for t, typ, uid, _, _, _, deleting in watch.snapshot()
                   if (deleting or typ == "DELETED") and (before is None or t < before) and uid != except_uid})


def gauges(stoker):
    """stoker's own gauges from its metrics endpoint: {"applications": n, "executors": {state: n}}."""
    args = list(stoker.proc.args)
    addr = args[args.index("--metrics-listen") + 1]
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {"applications": None, "executors": {}}
    for line in text.splitlines():
        if line.startswith("stoker_applications "):
            out["applications"] = int(float(line.split()[1]))
        m = re.match(r'stoker_executors\{state="([^"]+)"\} (\S+)', line)
        if m:
            out["executors"][m.group(1)] = int(float(m.group(2)))
    return out


def wait_idle(stoker, timeout=120):
    """Until stoker's own gauges say it holds no application and no executor (the figure "at
    rest" is taken then, not after a fixed pause)."""
    def idle():
        g = gauges(stoker)
        return g["applications"] == 0 and not any(g["executors"].values())
    wait_for(idle, timeout, "stoker's gauges at 0 applications and 0 executors")


def last_log_time(stoker, needle, since_wall):
    """Wall time of the last line of stoker's log holding `needle` at or after `since_wall`."""
    last = None
    for line in stoker.log().splitlines():
        if needle in line:
            t = datetime.datetime.strptime(line[:26], "%Y-%m-%dT%H:%M:%S.%f").replace(
                tzinfo=datetime.timezone.utc).timestamp()
            if t >= since_wall - 1:
                last = t
    return last


def unregister_all(apps, watch, stoker, api, s, key):
    t_unreg, wall = time.monotonic(), time.time()
    for a in apps:
        a.unregister()
    if not watch.wait_gone(time.monotonic() + 900):
        raise AssertionError("timed out after 900 s waiting for every pod gone after the unregister")
    s[f"t_all_gone{key}_s"] = time.monotonic() - t_unreg
    last = last_log_time(stoker, "pod deletion requested", wall)
    s[f"t_deletes_sent{key}_s"] = (last - wall) if last else None


def ramp_again(harness, stoker, watch, apps_n, per, s, apps):
    """A second ramp and unregister of as many applications (new ids), no fault: is the RSS
    left after the first cycle reused (allocator retention) or does it grow again?"""
    pid, total = stoker.proc.pid, apps_n * per
    second = []
    beats = Heartbeats(second)
    try:
        for i in range(apps_n):
            a = App(stoker.port, i, per, prefix="again")
            apps.append(a)  # closed by the caller
            a.register()
            second.append(a)
        k0, t0 = cpu_s(pid), time.monotonic()
        for a in second:
            a.request(per)

        def running():
            n = sum(1 for r in pod_times(watch).values() if r[0].startswith("again-") and r[3] is not None)
            log(f"second ramp: pods Running {n}/{total}")
            return n >= total and sum(len(a.running()) for a in second) >= total
        wait_for(running, 1800, f"{total} pods Running (second ramp)", interval=5)
        s["t_running_2_s"] = time.monotonic() - t0
        s["ramp_stoker_cpu_2_s"] = cpu_s(pid) - k0
        wait_for(lambda: gauges(stoker)["executors"].get("running", 0) >= total, 120,
                 f"stoker's gauges at {total} running executors")
        s["rss_tracked_2_mib"] = rss_mib(pid)
        s["spurious_exited_2"] = sum(len(a.exited()) for a in second)
    finally:
        beats.stop()
    unregister_all(second, watch, stoker, harness.api, s, "_2")
    wait_idle(stoker)
    s["rss_after_2_mib"] = rss_mib(pid)


def run(harness, apps_n, per, s, again):
    total = apps_n * per
    api = harness.api
    harness.namespace(NS)
    proxy = FaultProxy(harness.testbed.port)
    stoker = ChaosStoker(harness.work, "scale", harness.kubeconfig(proxy.port, "scale"), 0, 1).start()
    pid = stoker.proc.pid
    watch = PodWatch(api, NS)
    apps, beats = [], None
    try:
        wait_idle(stoker)  # its metrics answer: started, nothing held
        s["rss_rest_mib"] = rss_mib(pid)
        beats = Heartbeats(apps)  # reads the list as it grows
        for i in range(apps_n):
            a = App(stoker.port, i, per)
            a.register()
            apps.append(a)
        log(f"{apps_n} applications registered; asking for {per} executors each")

        # -- ramp --
        c0, k0, t0 = cpu_snapshot(), cpu_s(pid), time.monotonic()
        peak = RssPeak(pid)
        for a in apps:
            a.request(per)

        def created():
            n = sum(1 for r in pod_times(watch).values() if r[2] is not None)
            log(f"pods created: {n}/{total}")
            return n >= total
        wait_for(created, 1800, f"{total} pods created", interval=5)
        times = pod_times(watch)
        s["t_created_s"] = max(r[2] for r in times.values()) - t0

        def running():
            n = sum(1 for r in pod_times(watch).values() if r[3] is not None)
            tracked = sum(len(a.running()) for a in apps)
            log(f"pods Running: {n}/{total}; executors RUNNING on the streams: {tracked}")
            return n >= total and tracked >= total
        wait_for(running, 1800, f"{total} pods Running and reported RUNNING", interval=5)
        times = pod_times(watch)
        s["t_running_s"] = max(r[3] for r in times.values() if r[3] is not None) - t0
        s["t_streams_running_s"] = max(max(t for t, _, st, _ in a.snapshot() if st == "EXECUTOR_STATE_RUNNING")
                                       for a in apps) - t0
        s["ramp_stoker_cpu_s"] = cpu_s(pid) - k0
        s["ramp_rss_peak_mib"] = peak.stop()
        s["ramp_cpu"] = cpu_delta(c0, cpu_snapshot())
        # The figure with every pod tracked, once stoker's gauges count them all as running.
        wait_for(lambda: gauges(stoker)["executors"].get("running", 0) >= total, 120,
                 f"stoker's gauges at {total} running executors")
        s["rss_tracked_mib"] = rss_mib(pid)
        s["gauges_tracked"] = gauges(stoker)

        # -- forced re-list under load (chaos.py case c) --
        victim_app = apps[0]
        victim_eid = sorted(victim_app.running(), key=int)[0]
        victim = next(p for p in api.pods(NS, labelSelector=f"spark-exec-id={victim_eid}")
                      if p["metadata"]["annotations"].get("stoker.dev/app-id") == victim_app.app_id)
        victim_uid = victim["metadata"]["uid"]
        offset = stoker.log_size()
        c0, k0 = cpu_snapshot(), cpu_s(pid)
        peak = RssPeak(pid)
        t_fault = time.monotonic()
        proxy.blackhole()
        api.delete_pod(victim["metadata"]["name"], NS, force=True)
        api.create(f"/api/v1/namespaces/{NS}/configmaps", {
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "scale-bump"}, "data": {"k": "v"}})
        rev = harness.compact_etcd()
        dropped = proxy.drop()
        proxy.heal()
        t_healed = time.monotonic()
        s["fault_s"] = t_healed - t_fault
        log(f"fault: {victim_app.app_id} executor {victim_eid} deleted behind stoker's back, etcd compacted at "
            f"{rev}, {dropped} connection(s) reset")
        _, t_relist = chaos.wait_log(stoker.log_path, offset, RELIST_MARKER, 300, stoker.proc, interval=0.02)
        s["relist_seen"] = True
        s["t_relist_line_s"] = t_relist - t_healed

        def victim_exited():
            return next((t for t, eid, _ in victim_app.exited() if eid == victim_eid), None)
        t_exit = wait_for(victim_exited, 600, f"executor {victim_eid} reported EXITED", interval=0.05)
        s["t_victim_exited_s"] = t_exit - t_healed
        s["victim_reason"] = next(r for _, eid, r in victim_app.exited() if eid == victim_eid)

        def replaced():
            live = [r for r in pod_times(watch).values() if r[0] == victim_app.app_id and r[3] is not None]
            return len(victim_app.running()) >= per and len(live) > per
        wait_for(replaced, 600, "the victim's replacement Running", interval=0.2)
        s["t_replacement_running_s"] = time.monotonic() - t_healed
        s["relist_stoker_cpu_s"] = cpu_s(pid) - k0
        s["relist_rss_peak_mib"] = peak.stop()
        s["relist_cpu"] = cpu_delta(c0, cpu_snapshot())
        s["relists_in_log"] = stoker.log_since(offset).count(RELIST_MARKER)
        time.sleep(20)  # two leases' worth: anything the re-list got wrong would show by now

        # -- loss checks, before the unregister --
        t_check = time.monotonic()
        s["deleted_unasked"] = len(deletions(watch, t_check, except_uid=victim_uid))
        added = watch.added()
        s["duplicate_ids"] = sum(len(u) - 1 for u in added.values())
        s["pods_created"] = sum(len(u) for u in added.values())
        spurious = [(a.app_id, eid, r) for a in apps for _, eid, r in a.exited()
                    if not (a is victim_app and eid == victim_eid)]
        s["spurious_exited"] = len(spurious)
        s["spurious_examples"] = spurious[:10]
        s["stream_errors"] = [a.stream_error for a in apps if a.stream_error]
        s["heartbeat_failures"] = len(beats.failures)
        s["watch_gaps"] = watch.gaps
        s["orphan_lines"] = sum(stoker.log().count(x) for x in ("no application owns: deleting it",
                                                                  "adoption window: deleting its pod"))

        # -- unregister all --
        beats.stop()
        unregister_all(apps, watch, stoker, api, s, "")
        wait_idle(stoker)
        s["rss_after_mib"] = rss_mib(pid)
        s["gauges_after"] = gauges(stoker)
        if again:
            ramp_again(harness, stoker, watch, apps_n, per, s, apps)
    finally:
        if beats is not None:
            beats.stop()
        for a in apps:
            a.close()
        watch.close()
        stoker.stop()
        proxy.close()
        harness._cleanup(NS)


def fmt(s, key, f="{:.1f}"):
    return f.format(s[key]) if key in s else "not reached"


def table(s):
    total = s["apps"] * s["per"]
    rows = [
        ("applications × executors (light gRPC drivers, process-less kubelet)", f"{s['apps']} × {s['per']} = {total:,}"),
        ("ramp: RequestTotalExecutors → all pods created (s)", fmt(s, "t_created_s")),
        ("ramp: → all pods Running (s)", fmt(s, "t_running_s")),
        ("ramp: → all executors RUNNING on the drivers' streams (s)", fmt(s, "t_streams_running_s")),
        ("stoker CPU seconds for the ramp", fmt(s, "ramp_stoker_cpu_s")),
        ("machine busy during the ramp", f"{100 * s['ramp_cpu']['machine_busy_share']:.0f}%" if "ramp_cpu" in s else "not reached"),
        ("stoker RSS at rest, before (MiB)", fmt(s, "rss_rest_mib")),
        ("stoker RSS peak during the ramp (MiB)", fmt(s, "ramp_rss_peak_mib")),
        (f"stoker RSS with {total:,} pods tracked (MiB)", fmt(s, "rss_tracked_mib")),
        ("stoker RSS after all unregistered and gone (MiB)", fmt(s, "rss_after_mib")
         + (f"; stoker's gauges then: {s['gauges_after']['applications']} applications, executors "
            + ", ".join(f"{k} {v}" for k, v in sorted(s["gauges_after"]["executors"].items()))
            if "gauges_after" in s else "")),
        ("re-list: seen in stoker's log (410 Gone → `pod watch: listing pods`)",
         f"yes ({s.get('relists_in_log')}×), {s['t_relist_line_s']:.2f} s after the heal" if s.get("relist_seen") else "no"),
        ("re-list: fault healed → pod deleted behind stoker's back reported EXITED (caught up) (s)",
         fmt(s, "t_victim_exited_s", "{:.2f}") + (f", {s['victim_reason']}" if "victim_reason" in s else "")),
        ("re-list: fault healed → its replacement Running (s)", fmt(s, "t_replacement_running_s", "{:.2f}")),
        ("re-list: stoker CPU seconds (fault → replacement Running)", fmt(s, "relist_stoker_cpu_s", "{:.2f}")),
        ("re-list: stoker RSS peak (MiB)", fmt(s, "relist_rss_peak_mib")),
        ("loss: pods deleted that no application asked for", str(s.get("deleted_unasked", "not reached"))),
        ("loss: executor ids with more than one pod", str(s.get("duplicate_ids", "not reached"))),
        (f"loss: spurious EXITED events on the {s['apps']} watch streams", str(s.get("spurious_exited", "not reached"))),
        ("unregister all → all pods gone (s)", fmt(s, "t_all_gone_s")
         + (f"; stoker's last delete request sent at {s['t_deletes_sent_s']:.1f} s" if s.get("t_deletes_sent_s") else "")),
    ]
    if s.get("again"):
        rows += [
            ("second ramp (new application ids, no fault): → all Running (s)", fmt(s, "t_running_2_s")),
            ("second ramp: stoker CPU seconds", fmt(s, "ramp_stoker_cpu_2_s")),
            (f"second ramp: stoker RSS with {total:,} pods tracked (MiB)", fmt(s, "rss_tracked_2_mib")),
            ("second ramp: EXITED events on its streams", str(s.get("spurious_exited_2", "not reached"))),
            ("second unregister → all pods gone (s)", fmt(s, "t_all_gone_2_s")),
            ("stoker RSS after the second cycle (MiB)", fmt(s, "rss_after_2_mib")),
        ]
    lines = ["| figure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    for err in s.get("errors", []):
        lines.append(f"| FAILED | {err} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--apps", type=int, default=100)
    ap.add_argument("--per", type=int, default=100)
    ap.add_argument("--again", action="store_true",
                    help="then a second ramp and unregister, no fault (is the memory left after the first reused?)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    s = {"apps": a.apps, "per": a.per, "again": a.again}
    t_start = time.monotonic()
    harness = Harness(qps=0)
    try:
        harness.start()
        run(harness, a.apps, a.per, s, a.again)
    except Exception as e:  # noqa: BLE001 - reported in the table
        log(f"FAILED: {e!r}")
        s.setdefault("errors", []).append(repr(e)[:300])
    finally:
        harness.stop()
    s["wall_s"] = time.monotonic() - t_start
    header = (f"Scale benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine()}; "
              f"stoker binary: {os.environ.get('STOKER_BIN', 'target/debug/stoker')} (STOKER_BIN; --auth none, --kube-qps 0, "
              f"create concurrency 64, lease 10 s); test bed: kube-apiserver without a pods watch cache "
              f"(--watch-cache-sizes=pods#0), process-less kubelet {os.environ['STOKER_KUBELET_BIN']}; "
              f"whole run {s['wall_s']:.0f} s.")
    text = header + "\n\n" + table(s) + "\n"
    (out / "scale.md").write_text(text)
    (out / "scale-samples.json").write_text(json.dumps(s, indent=1, default=str))
    print(text)
    loss = [s.get(k) for k in ("deleted_unasked", "duplicate_ids", "spurious_exited")]
    loss += [s.get("spurious_exited_2")] if a.again else []
    sys.exit(1 if s.get("errors") or any(v != 0 for v in loss) else 0)


if __name__ == "__main__":
    main()
