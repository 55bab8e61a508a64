"""Fair share of one bound between two applications, stoker against Spark's built-in Kubernetes
backend, on the same test bed in one run (issue 13, "How it is shown": the fairness benchmark).

The harness is bench_k8s.py's (test bed, process-less kubelet NOPROC, stoker with --auth none,
real Spark 4.2.0 drivers of jobs/hold.py in client mode, so no driver pod is in the bed and only
executor pods count). Per system, in a namespace of its own that both drivers use:

* the bound: a ResourceQuota of CAPACITY (20) pods in the namespace, for both systems; stoker
  also gets a queue file (`--queues`, through STOKER_QUEUES) of capacity 20 executors with one
  queue, `default`, that both applications map to (one queue: the two applications share it by
  max-min fairness inside the queue, which is the case the issue is about; two queues of equal
  weight would give the same split);
* application A asks for 20 executors (static, spark.executor.instances=20); B's driver is
  launched DELAY (20) s after A has asked (A's "ready" line: its SparkContext is up and has
  asked) and asks for 20 as well; both hold until HOLD (90) s after B's launch, then both stop.
  B "arrives" at its driver's launch: a driver asks for its executors while its SparkContext
  starts (about 6 s here), and under stoker B's executors can run before its ready line.

On the process-less node no executor ever registers with its driver, so under stoker the
reclaim's first path is what runs: the plugin stops executors that have not registered through
stoker (KillExecutors) instead of decommissioning them.

Figures come from one pod watch on the namespace (executor pods by their spark-app-selector
label), replayed at every second of the window from B's launch to the end of the hold:
running and pending pods per application; Jain's fairness index of the two applications'
running executors, J = (a + b)^2 / (2 (a^2 + b^2)) (1 = equal, 0.5 = one has everything),
averaged over the window and its value 30 s after B's launch; the time from B's launch until B
has its first Running executor pod and until it has 8; the most pods Pending at once (both
applications, over the whole run and after B's launch); pods created in all; pod creations the API server refused for the quota (its
own counter apiserver_request_total{verb="POST",resource="pods",code="403"}, and the lines of
the drivers' and stoker's logs that mention the quota); and stoker's fair-share messages in A's
log (`stoker: admitted …`, `stoker: give back …`, `stoker: giving back …`).

Usage: bench_fairness.py --out DIR [--capacity 20] [--delay 20] [--hold 90]
Writes DIR/fairness.md (the table), DIR/fairness-samples.json (every second of both runs) and
the drivers' and stoker's logs under DIR/logs; prints the table. Asserts nothing about the
figures.
"""
import argparse
import json
import os
import re
import shutil
import signal
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# bench_k8s picks the kubelet binary and puts tests/e2e on sys.path.
from bench_k8s import IMAGE, Bench, TimedWatch, machine, stoker_binary  # noqa: E402
from testbed import wait_until  # noqa: E402

SYSTEMS = (("spark", "Spark built-in"), ("stoker", "stoker"))
# A pod creation a driver reports refused: Spark's allocator logs an ERROR per attempt, stoker's
# plugin relays stoker's one warning per waiting executor.
REFUSAL = re.compile(r"ERROR ExecutorPodsAllocator: Failed to create executor pod|"
                     r"stoker: executor \d+ is waiting: .*exceeded quota")
FAIR_MESSAGE = re.compile(r"stoker: (admitted|give back|giving back|removing executors)[^\n]*")


def queue_file(capacity):
    return f"""default_queue = "default"

[capacity]
executors = {capacity}

[[queues]]
name = "default"
allow = ["*"]
"""


class AppWatch(TimedWatch):
    """bench_k8s's TimedWatch (reconnecting, timed), also noting each pod's application (its
    spark-app-selector label)."""

    def __init__(self, api, namespace):
        self.app_of = {}
        super().__init__(api, namespace)

    def on_event(self, t, ev):
        meta = (ev.get("object") or {}).get("metadata") or {}
        app = (meta.get("labels") or {}).get("spark-app-selector")
        if meta.get("name") and app:
            with self.lock:
                self.app_of[meta["name"]] = app

    def replay(self):
        """[(time, {pod: (phase, deleting, gone)})] after every event, in order."""
        state, out = {}, []
        for t, typ, o in sorted(self.snapshot(), key=lambda e: e[0]):
            state[o["name"]] = (o["phase"], o["deleting"], typ == "DELETED")
            out.append((t, dict(state)))
        return out


def counts(state, app_of, apps):
    """{app: (running, pending)} of one replayed state."""
    c = {a: [0, 0] for a in apps}
    for name, (phase, deleting, gone) in state.items():
        app = app_of.get(name)
        if app not in c or deleting or gone:
            continue
        if phase == "Running":
            c[app][0] += 1
        elif phase in ("Pending", None):
            c[app][1] += 1
    return c


def jain(xs):
    s, q = sum(xs), sum(x * x for x in xs)
    return (s * s) / (len(xs) * q) if q else None


def refused_pod_creates(testbed):
    """Pod creations the API server refused with 403 (here: the quota), from its own counters."""
    api = testbed.api
    req = urllib.request.Request(f"{api.url}/metrics")
    req.add_header("Authorization", f"Bearer {api.token}")
    with urllib.request.urlopen(req, context=api.ctx, timeout=30) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("apiserver_request_total{") and 'verb="POST"' in line
               and 'resource="pods"' in line and 'code="403"' in line and 'subresource="binding"' not in line)


class FairnessBench(Bench):
    def __init__(self, out, capacity, delay, hold):
        super().__init__(out, quick=False)
        self.capacity, self.delay, self.hold = capacity, delay, hold
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.results = {}

    def start(self):
        # bench_k8s's test bed, kubelets and stoker ("bench"); stoker reads the queue file from
        # STOKER_QUEUES (its --queues). The "spark" system does not use stoker at all.
        queues = self.work / "queues.toml"
        queues.write_text(queue_file(self.capacity))
        os.environ["STOKER_QUEUES"] = str(queues)
        super().start()

    def driver(self, system, ns):
        """A hold.py driver asking for CAPACITY executors; (process, stop file, its log)."""
        before = set(self.work.glob("driver-*.log"))
        p, stop = self.hold_driver(system, self.capacity, ns)
        log = next(iter(set(self.work.glob("driver-*.log")) - before))
        return p, stop, log

    def run_system(self, system):
        ns = self.namespace(f"fair-{system}")
        api = self.testbed.api
        api.create(f"/api/v1/namespaces/{ns}/resourcequotas", {
            "apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "executors"},
            "spec": {"hard": {"pods": str(self.capacity)}}})
        wait_until(lambda: (api.get(f"/api/v1/namespaces/{ns}/resourcequotas/executors").get("status") or {})
                   .get("hard"), 60, "the quota to be in force")
        watch = AppWatch(api, ns)
        refused0 = refused_pod_creates(self.testbed)
        stoker_log = self.work / "stoker-bench.log"
        stoker_quota0 = stoker_log.read_text().count("resource quota exceeded") if stoker_log.exists() else 0
        drivers = []
        try:
            t_a_launch = time.time()
            pa, stop_a, log_a = self.driver(system, ns)
            drivers.append((pa, stop_a))
            ready_a = self.wait_ready(pa)
            print(f"[bench-fairness] {system}: A asked for {self.capacity} ({ready_a['app_id']})", file=sys.stderr,
                  flush=True)
            time.sleep(max(0.0, ready_a["t"] + self.delay - time.time()))
            t_b_launch = time.time()
            pb, stop_b, log_b = self.driver(system, ns)
            drivers.append((pb, stop_b))
            ready_b = self.wait_ready(pb)
            # B's arrival is its driver's launch: a driver asks for its executors while its
            # SparkContext starts, so under stoker B's executors can run before the ready line.
            t_b = t_b_launch
            print(f"[bench-fairness] {system}: B launched {t_b - ready_a['t']:.1f} s after A asked, ready after "
                  f"{ready_b['t'] - t_b:.1f} s ({ready_b['app_id']})", file=sys.stderr, flush=True)
            time.sleep(max(0.0, t_b + self.hold - time.time()))
            t_end = time.time()
            for p, stop in drivers:
                stop.touch()
            for p, stop in drivers:
                self.end_driver(p, stop)
            # Every event of the window is in once the watch has seen both drivers' pods go.
            def all_gone():
                replay = watch.replay()
                return not replay or all(gone for _, _, gone in replay[-1][1].values())
            wait_until(all_gone, 120, "both drivers' executor pods gone")
            refused = refused_pod_creates(self.testbed) - refused0
        finally:
            for p, _ in drivers:  # after a failure: no driver may outlive its part
                if p.poll() is None:
                    p.kill()
                    p.wait()
            watch.close()
            self.drop_namespace(ns)
        apps = {"A": ready_a["app_id"], "B": ready_b["app_id"]}
        with watch.lock:
            app_of = dict(watch.app_of)
        replay = watch.replay()
        ids = list(apps.values())

        def at(t):
            state = {}
            for te, s in replay:
                if te > t:
                    break
                state = s
            return counts(state, app_of, ids)

        # Every second from A's launch to the end of the hold.
        seconds = []
        for k in range(int(t_end - t_a_launch) + 1):
            t = t_a_launch + k
            c = at(t)
            seconds.append({"t_since_b_launch": round(t - t_b, 1),
                            **{f"{w}_running": c[i][0] for w, i in apps.items()},
                            **{f"{w}_pending": c[i][1] for w, i in apps.items()}})
        window = [s for s in seconds if 0 < s["t_since_b_launch"] <= self.hold]
        js = [jain([s["A_running"], s["B_running"]]) for s in window]
        js = [j for j in js if j is not None]
        at30 = at(t_b + 30)
        j30 = jain([at30[ids[0]][0], at30[ids[1]][0]])

        def b_reaches(n):
            if at(t_b)[ids[1]][0] >= n:
                return 0.0
            for te, s in replay:
                if te > t_b and counts(s, app_of, ids)[ids[1]][0] >= n:
                    return te - t_b
            return None
        pending = [(te, sum(v[1] for v in counts(s, app_of, ids).values())) for te, s in replay]
        max_pending = max((n for _, n in pending), default=0)
        max_pending_after_b = max([n for te, n in pending if te >= t_b] + [at(t_b)[ids[0]][1] + at(t_b)[ids[1]][1]])
        created = {w: len({n for n, a in app_of.items() if a == i}) for w, i in apps.items()}
        logs = {}
        for w, src in (("A", log_a), ("B", log_b)):
            dst = self.logs / f"{system}-{w}.log"
            shutil.copy(src, dst)
            logs[w] = dst.read_text(errors="replace")
        fair_a_lines = [m.group(0) for m in FAIR_MESSAGE.finditer(logs["A"])]
        fair_b_lines = [m.group(0) for m in FAIR_MESSAGE.finditer(logs["B"])]
        stoker_quota = 0
        if system == "stoker" and stoker_log.exists():
            stoker_quota = stoker_log.read_text().count("resource quota exceeded") - stoker_quota0
        sample = {
            "system": system, "apps": apps,
            "b_launched_after_a_asked_s": t_b - ready_a["t"], "b_launch_to_ready_s": ready_b["t"] - t_b,
            "jain_mean": sum(js) / len(js) if js else None, "jain_at_30s": j30,
            "b_first_s": b_reaches(1), "b_8_s": b_reaches(8),
            "end_running": {w: seconds[-1][f"{w}_running"] for w in apps},
            "mean_running": {w: sum(s[f"{w}_running"] for s in window) / max(len(window), 1) for w in apps},
            "max_pending": max_pending, "max_pending_after_b": max_pending_after_b, "pods_created": sum(created.values()), "pods_created_by_app": created,
            "refused_by_quota_api": refused,
            "quota_log_lines": {"A": len(REFUSAL.findall(logs["A"])), "B": len(REFUSAL.findall(logs["B"])),
                                "stoker": stoker_quota},
            "fair_messages_a": len(fair_a_lines), "fair_lines_a": fair_a_lines[:20], "fair_lines_b": fair_b_lines[:20],
            "seconds": seconds,
            # The watch's events, to compute other figures from: (s since B's launch, type, pod,
            # phase, deleting, application A or B).
            "events": [(round(t - t_b, 3), typ, o["name"], o["phase"], o["deleting"],
                        next((w for w, i in apps.items() if app_of.get(o["name"]) == i), None))
                       for t, typ, o in watch.snapshot()],
        }
        print(f"[bench-fairness] {system}: " + json.dumps({k: v for k, v in sample.items()
                                                            if k not in ("seconds", "events")}),
              file=sys.stderr, flush=True)
        return sample

    def run(self):
        for system, _ in SYSTEMS:
            print(f"[bench-fairness] {system}", file=sys.stderr, flush=True)
            try:
                self.results[system] = self.run_system(system)
            except Exception as e:  # noqa: BLE001 - shown in the table
                print(f"[bench-fairness] {system} FAILED: {e!r}", file=sys.stderr, flush=True)
                self.results[system] = {"system": system, "error": repr(e)}
        if (self.work / "stoker-bench.log").exists():
            shutil.copy(self.work / "stoker-bench.log", self.logs / "stoker.log")

    def table(self):
        sp, st = self.results.get("spark") or {}, self.results.get("stoker") or {}
        lines = ["| figure | Spark built-in | stoker | stoker vs built-in |", "|---|---|---|---|"]
        for s in (sp, st):
            if s.get("error"):
                lines.append(f"| {s['system']} failed | {s['error']} | | |")
        if sp.get("error") or st.get("error") or not (sp and st):
            return "\n".join(lines)

        def num(v, fmt):
            return "never" if v is None else fmt.format(v)

        def ratio(a, b, fmt="{:.3g}×"):
            if a is None or b is None:
                return ""
            return "∞" if a == 0 and b else fmt.format(b / a) if a else ""
        h = self.hold
        rows = [
            (f"Jain's index of running executors, mean over the {h:.0f} s after B's launch", "jain_mean", "{:.3f}", True),
            ("Jain's index 30 s after B's launch", "jain_at_30s", "{:.3f}", True),
            ("B's launch → B's first executor Running (s)", "b_first_s", "{:.1f}", False),
            ("B's launch → B has 8 executors Running (s)", "b_8_s", "{:.1f}", False),
            ("most executor pods Pending at once, whole run (A's ramp included)", "max_pending", "{}", True),
            ("most executor pods Pending at once after B's launch", "max_pending_after_b", "{}", True),
            ("executor pods created in all (A + B)", "pods_created", "{}", True),
            ("pod creations refused by the quota (API server, 403 on POST pods)", "refused_by_quota_api", "{:.0f}",
             True),
        ]
        for label, key, fmt, plain in rows:
            a, b = sp.get(key), st.get(key)
            if plain:
                r = ratio(a, b)
            elif a is None and b is not None:
                r = f"B never got one in {h:.0f} s under Spark's backend"
            else:
                r = ratio(b, a, "{:.1f}× faster") if a and b else ""
            lines.append(f"| {label} | {num(a, fmt)} | {num(b, fmt)} | {r} |")
        lines.append("| running executors A / B, mean over the window | "
                     + " | ".join(f"{s['mean_running']['A']:.1f} / {s['mean_running']['B']:.1f}" for s in (sp, st))
                     + " | |")
        lines.append("| running executors A / B at the end of the hold | "
                     + " | ".join(f"{s['end_running']['A']} / {s['end_running']['B']}" for s in (sp, st)) + " | |")
        lines.append("| refusals in the logs: driver A, driver B, stoker (Spark: `ERROR ExecutorPodsAllocator: Failed to "
                     "create executor pod N`, one per attempt; stoker's plugin: `stoker: executor N is waiting: … "
                     "exceeded quota`, one per executor; stoker: `resource quota exceeded`) | "
                     + " | ".join(f"{s['quota_log_lines']['A']}, {s['quota_log_lines']['B']}, "
                                  f"{s['quota_log_lines']['stoker'] if s is st else '–'}" for s in (sp, st)) + " | |")
        def shown(msgs):
            return "; ".join(f"`{x if len(x) <= 110 else x[:110] + ' …'}`" for x in msgs[:4]).replace("|", "\\|")
        for w in ("a", "b"):
            lines.append(f"| stoker's fair-share messages in {w.upper()}'s log | {len(sp[f'fair_lines_{w}'])} | "
                         f"{len(st[f'fair_lines_{w}'])}: {shown(st[f'fair_lines_{w}'])} | |")
        return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for fairness.md, the samples and the logs")
    ap.add_argument("--capacity", type=int, default=20,
                    help="the bound (ResourceQuota pods, stoker's queue capacity) and each driver's ask")
    ap.add_argument("--delay", type=float, default=20, help="seconds between A's request and B's launch")
    ap.add_argument("--hold", type=float, default=90, help="seconds both hold after B's launch")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # SIGTERM (e.g. from `timeout`) ends the run through the finally below: no process, pod or
    # test bed is left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bench = FairnessBench(out, a.capacity, a.delay, a.hold)
    t0 = time.time()
    try:
        bench.start()
        bench.run()
    finally:
        bench.stop()
        shutil.rmtree(bench.work, ignore_errors=True)
    header = (f"Fairness benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} ({time.time() - t0:.0f} s); "
              f"machine: {machine()}; stoker binary: {stoker_binary().relative_to(bench_root())}; "
              f"Spark {IMAGE}; test bed: kube-apiserver v1.37.2, process-less kubelet. Bound: ResourceQuota of "
              f"{a.capacity} pods per namespace for both, and for stoker a queue file of capacity {a.capacity} "
              f"executors with one queue. A asks {a.capacity} executors, B asks {a.capacity} about {a.delay:.0f} s "
              f"later (its driver launched {a.delay:.0f} s after A's had asked); both hold {a.hold:.0f} s after "
              f"B's launch.")
    text = header + "\n\n" + bench.table() + "\n"
    (out / "fairness.md").write_text(text)
    (out / "fairness-samples.json").write_text(json.dumps(bench.results, indent=1))
    print(text)


def bench_root():
    return Path(__file__).resolve().parents[2]


if __name__ == "__main__":
    main()
