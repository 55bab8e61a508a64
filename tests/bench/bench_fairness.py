"""Fair share of one bound between applications, stoker against Spark's built-in Kubernetes
backend, on the same test bed in one run (issue 13, "How it is shown": the fairness benchmark).

The harness is bench_k8s.py's (test bed, process-less kubelet NOPROC, stoker with --auth none,
real Spark 4.2.0 drivers of jobs/hold.py in client mode, so no driver pod is in the bed and only
executor pods count). Per system, in a namespace of its own that every driver uses, the bound is
a ResourceQuota of CAPACITY pods, for both systems; stoker also gets a queue file (`--queues`,
through STOKER_QUEUES) of capacity CAPACITY executors with one queue, `default`, that every
application maps to (max-min fairness inside the queue; queues of equal weight would split the
same). Two scenarios (`--scenario`):

* `three` (the issue's, the default): capacity 60; A (dynamic allocation, maxExecutors 200, a
  job of 10,000 tasks that never run, so its backlog stays) at 0 s; B and C (dynamic allocation,
  maxExecutors 100, the same backlog) launched 60 s and 120 s after A's SparkContext is up; all
  hold until 120 s after C's launch;
* `two`: capacity 20; A and B static (spark.executor.instances 20), B launched 20 s after A is
  up; both hold 90 s after B's launch.

On the process-less node no executor ever registers with its driver, so dynamic allocation's
backlog never drains (the target climbs to maxExecutors), and under stoker the reclaim's first
path is what runs: the plugin stops executors that have not registered through stoker
(KillExecutors) instead of decommissioning them.

Figures come from one pod watch on the namespace (executor pods by their spark-app-selector
label), replayed at every second: running and pending pods per application; each application's
fair share at that second (max-min of CAPACITY over the applications launched so far, each
asking its maxExecutors or instances); per arrival, the time until every application launched
so far is within ±10% of its fair share (running pods); Jain's fairness index of the running
executors, J = (Σx)² / (n Σx²) (1 = equal, 1/n = one has everything), averaged over the window
in which all applications are present (the overlap) and its value 30 s after the last launch;
each later application's time to its first Running executor pod; the most pods Pending at once;
pods created in all; pod creations the API server refused for the quota (its own counter
apiserver_request_total{verb="POST",resource="pods",code="403"}, and the lines of the drivers'
and stoker's logs that mention the quota); the API server's requests over the run (all
clients); and stoker's fair-share messages in the drivers' logs (`stoker: admitted …`,
`stoker: give back …`, `stoker: giving back …`).

Usage: bench_fairness.py --out DIR [--scenario three|two] [--hold S]
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
from bench_k8s import IMAGE, Bench, TimedWatch, api_requests, machine, stoker_binary  # noqa: E402
from testbed import wait_until  # noqa: E402

SYSTEMS = (("spark", "Spark built-in"), ("stoker", "stoker"))
BACKLOG_TASKS = 10000


class App:
    """One application of a scenario: launched `at` s after A's SparkContext is up, asking for
    `ask` executors (dynamic allocation's maxExecutors, or spark.executor.instances)."""

    def __init__(self, name, at, ask, dynamic):
        self.name, self.at, self.ask, self.dynamic = name, at, ask, dynamic


SCENARIOS = {
    "three": (60, [App("A", 0, 200, True), App("B", 60, 100, True), App("C", 120, 100, True)], 120),
    "two": (20, [App("A", 0, 20, False), App("B", 20, 20, False)], 90),
}
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


def fair_shares(capacity, asks):
    """Max-min fair shares of `capacity` among demands `asks` (water-filling; equal weights)."""
    shares, left, open_ = [0.0] * len(asks), float(capacity), list(range(len(asks)))
    while open_ and left > 1e-9:
        each = left / len(open_)
        done = [i for i in open_ if asks[i] - shares[i] <= each]
        if not done:
            for i in open_:
                shares[i] += each
            break
        for i in done:
            left -= asks[i] - shares[i]
            shares[i] = asks[i]
        open_ = [i for i in open_ if i not in done]
    return shares


def within(running, share, tolerance=0.10):
    return abs(running - share) <= tolerance * share


class FairnessBench(Bench):
    def __init__(self, out, scenario, hold=None):
        super().__init__(out, quick=False)
        self.scenario = scenario
        self.capacity, self.apps, default_hold = SCENARIOS[scenario]
        self.hold = default_hold if hold is None else hold
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

    def driver(self, system, ns, app):
        """A hold.py driver for `app`; (process, stop file, its log)."""
        before = set(self.work.glob("driver-*.log"))
        extra = []
        if app.dynamic:
            extra = ["--backlog", str(BACKLOG_TASKS),
                     "--conf", "spark.dynamicAllocation.enabled=true",
                     "--conf", "spark.dynamicAllocation.shuffleTracking.enabled=true",
                     "--conf", "spark.dynamicAllocation.minExecutors=0",
                     "--conf", f"spark.dynamicAllocation.maxExecutors={app.ask}"]
        # --light: three driver JVMs and the test bed share 2 cores.
        p, stop = self.hold_driver(system, 0 if app.dynamic else app.ask, ns, light=True, extra=extra)
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
        requests0 = api_requests(self.testbed)
        stoker_log = self.work / "stoker-bench.log"
        stoker_quota0 = stoker_log.read_text().count("resource quota exceeded") if stoker_log.exists() else 0
        drivers, launched, ready, logs_of = [], {}, {}, {}
        try:
            t0 = None
            for app in self.apps:
                if t0 is not None:
                    time.sleep(max(0.0, t0 + app.at - time.time()))
                launched[app.name] = time.time()
                p, stop, log = self.driver(system, ns, app)
                drivers.append((p, stop))
                logs_of[app.name] = log
                ready[app.name] = self.wait_ready(p)
                if t0 is None:
                    t0 = ready[app.name]["t"]  # A's SparkContext is up and has asked
                print(f"[bench-fairness] {system}: {app.name} launched at {launched[app.name] - t0:.1f} s, ready "
                      f"after {ready[app.name]['t'] - launched[app.name]:.1f} s ({ready[app.name]['app_id']})",
                      file=sys.stderr, flush=True)
            t_last = launched[self.apps[-1].name]
            time.sleep(max(0.0, t_last + self.hold - time.time()))
            t_end = time.time()
            for p, stop in drivers:
                stop.touch()
            for p, stop in drivers:
                self.end_driver(p, stop)
            requests1 = api_requests(self.testbed)

            # Every event of the window is in once the watch has seen every driver's pods go.
            def all_gone():
                replay = watch.replay()
                return not replay or all(gone for _, _, gone in replay[-1][1].values())
            wait_until(all_gone, 300, "every driver's executor pods gone")
            refused = refused_pod_creates(self.testbed) - refused0
        finally:
            for p, _ in drivers:  # after a failure: no driver may outlive its part
                if p.poll() is None:
                    p.kill()
                    p.wait()
            watch.close()
            self.drop_namespace(ns)
        names = [a.name for a in self.apps]
        ids = [ready[w]["app_id"] for w in names]
        with watch.lock:
            app_of = dict(watch.app_of)
        replay = watch.replay()

        def named(state):
            c = counts(state, app_of, ids)
            return {w: c[i] for w, i in zip(names, ids)}

        def at(t):
            state = {}
            for te, st in replay:
                if te > t:
                    break
                state = st
            return named(state)

        def shares(t):
            present = [a for a in self.apps if launched[a.name] <= t]
            return dict(zip([a.name for a in present], fair_shares(self.capacity, [a.ask for a in present])))

        # Every second from A's ready line to the end of the hold.
        seconds = []
        for k in range(int(t_end - t0) + 1):
            t = t0 + k
            c, sh = at(t), shares(t)
            seconds.append({"t": k, **{f"{w}_running": c[w][0] for w in names},
                            **{f"{w}_pending": c[w][1] for w in names},
                            **{f"{w}_share": round(sh.get(w, 0.0), 2) for w in names}})
        overlap = [s for s in seconds if s["t"] > t_last - t0]
        js = [j for j in (jain([s[f"{w}_running"] for w in names]) for s in overlap) if j is not None]
        c30 = at(t_last + 30)
        j30 = jain([c30[w][0] for w in names])

        def converged_after(t_from, t_to):
            """Seconds from t_from until every application launched by then is within ±10% of its
            fair share, from the replayed events before t_to; None if never."""
            sh = shares(t_from)
            # The state at t_from, then each replayed state up to t_to (each already whole).
            states = [(t_from, at(t_from))] + [(te, named(st)) for te, st in replay if t_from < te <= t_to]
            for te, c in states:
                if all(within(c[w][0], share) for w, share in sh.items()):
                    return te - t_from
            return None
        starts = [launched[a.name] for a in self.apps]
        # A's phase starts when it is up (its driver has asked); the others' at their launch.
        starts[0] = t0
        ends = starts[1:] + [t_end]
        convergence = {a.name: converged_after(s, e) for a, s, e in zip(self.apps, starts, ends)}

        def first_running(w):
            for te, st in replay:
                if counts(st, app_of, ids)[ready[w]["app_id"]][0] >= 1:
                    return max(0.0, te - launched[w])
            return None
        pending = [sum(v[1] for v in counts(st, app_of, ids).values()) for _, st in replay]
        created = {w: len({n for n, a in app_of.items() if a == ready[w]["app_id"]}) for w in names}
        logs, fair_lines = {}, {}
        for w in names:
            dst = self.logs / f"{system}-{w}.log"
            shutil.copy(logs_of[w], dst)
            logs[w] = dst.read_text(errors="replace")
            fair_lines[w] = [m.group(0) for m in FAIR_MESSAGE.finditer(logs[w])]
        stoker_quota = 0
        if system == "stoker" and stoker_log.exists():
            stoker_quota = stoker_log.read_text().count("resource quota exceeded") - stoker_quota0
        sample = {
            "system": system, "apps": dict(zip(names, ids)),
            "launched_s": {w: round(launched[w] - t0, 1) for w in names},
            "ready_after_launch_s": {w: round(ready[w]["t"] - launched[w], 1) for w in names},
            "jain_mean": sum(js) / len(js) if js else None, "jain_30s_after_last": j30,
            "convergence_s": convergence, "first_running_s": {w: first_running(w) for w in names},
            "end_running": {w: seconds[-1][f"{w}_running"] for w in names},
            "mean_running_overlap": {w: sum(s[f"{w}_running"] for s in overlap) / max(len(overlap), 1) for w in names},
            "max_pending": max(pending, default=0), "pods_created": sum(created.values()), "pods_created_by_app": created,
            "refused_by_quota_api": refused,
            "api_requests": requests1[1] - requests0[1], "api_requests_window_s": requests1[0] - requests0[0],
            "quota_log_lines": {**{w: len(REFUSAL.findall(logs[w])) for w in names}, "stoker": stoker_quota},
            "fair_lines": {w: v[:20] for w, v in fair_lines.items()},
            "fair_counts": {w: len(v) for w, v in fair_lines.items()},
            "seconds": seconds,
            # The watch's events, to compute other figures from: (s since A was up, type, pod,
            # phase, deleting, application).
            "events": [(round(t - t0, 3), typ, o["name"], o["phase"], o["deleting"],
                        next((w for w in names if app_of.get(o["name"]) == ready[w]["app_id"]), None))
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

        def faster(a, b):
            if a is None and b is not None:
                return "never under Spark's backend"
            return f"{a / b:.1f}× faster" if a and b else ""
        names = [a.name for a in self.apps]
        last = self.apps[-1]
        lines.append(f"| Jain's index of running executors, mean over the overlap ({last.name}'s launch + "
                     f"{self.hold:.0f} s) | {num(sp['jain_mean'], '{:.3f}')} | {num(st['jain_mean'], '{:.3f}')} | "
                     f"{ratio(sp['jain_mean'], st['jain_mean'])} |")
        lines.append(f"| Jain's index 30 s after {last.name}'s launch | {num(sp['jain_30s_after_last'], '{:.3f}')} | "
                     f"{num(st['jain_30s_after_last'], '{:.3f}')} | |")
        for i, a in enumerate(self.apps):
            present = ", ".join(names[:i + 1])
            shares = fair_shares(self.capacity, [x.ask for x in self.apps[:i + 1]])
            what = "A is up" if i == 0 else f"{a.name}'s launch"
            lines.append(f"| {what} → {present} all within ±10% of the fair share "
                         f"({' / '.join(f'{x:.0f}' for x in shares)}) (s) | {num(sp['convergence_s'][a.name], '{:.1f}')} | "
                         f"{num(st['convergence_s'][a.name], '{:.1f}')} | "
                         f"{faster(sp['convergence_s'][a.name], st['convergence_s'][a.name])} |")
        for a in self.apps[1:]:
            lines.append(f"| {a.name}'s launch → its first executor Running (s) | "
                         f"{num(sp['first_running_s'][a.name], '{:.1f}')} | {num(st['first_running_s'][a.name], '{:.1f}')} | "
                         f"{faster(sp['first_running_s'][a.name], st['first_running_s'][a.name])} |")
        for label, key, fmt in (("most executor pods Pending at once", "max_pending", "{}"),
                                ("executor pods created in all", "pods_created", "{}"),
                                ("pod creations refused by the quota (API server, 403 on POST pods)",
                                 "refused_by_quota_api", "{:.0f}"),
                                ("API server requests over the run, all clients", "api_requests", "{:.0f}")):
            lines.append(f"| {label} | {num(sp.get(key), fmt)} | {num(st.get(key), fmt)} | "
                         f"{ratio(sp.get(key), st.get(key))} |")
        lines.append(f"| running executors {' / '.join(names)}, mean over the overlap | "
                     + " | ".join(" / ".join(f"{s['mean_running_overlap'][w]:.1f}" for w in names) for s in (sp, st))
                     + " | |")
        lines.append(f"| running executors {' / '.join(names)} at the end | "
                     + " | ".join(" / ".join(str(s['end_running'][w]) for w in names) for s in (sp, st)) + " | |")
        lines.append("| refusals in the logs: drivers " + ", ".join(names) + ", stoker (Spark: `ERROR "
                     "ExecutorPodsAllocator: Failed to create executor pod N`, one per attempt; stoker's plugin: "
                     "`stoker: executor N is waiting: … exceeded quota`, one per executor; stoker: `resource quota "
                     "exceeded`) | " + " | ".join(", ".join(str(s['quota_log_lines'][w]) for w in names) + ", "
                                                  + (str(s['quota_log_lines']['stoker']) if s is st else '–')
                                                  for s in (sp, st)) + " | |")

        def shown(msgs):
            return "; ".join(f"`{x if len(x) <= 110 else x[:110] + ' …'}`" for x in msgs[:4]).replace("|", "\\|")
        for w in names:
            lines.append(f"| stoker's fair-share messages in {w}'s log | {sp['fair_counts'][w]} | "
                         f"{st['fair_counts'][w]}: {shown(st['fair_lines'][w])} | |")
        return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for fairness.md, the samples and the logs")
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="three",
                    help="three: the issue's (capacity 60, A/B/C with dynamic allocation at 0/60/120 s); "
                         "two: capacity 20, two static applications 20 s apart")
    ap.add_argument("--hold", type=float, help="seconds all hold after the last launch (three: 120, two: 90)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # SIGTERM (e.g. from `timeout`) ends the run through the finally below: no process, pod or
    # test bed is left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bench = FairnessBench(out, a.scenario, a.hold)
    t0 = time.time()
    try:
        bench.start()
        bench.run()
    finally:
        bench.stop()
        shutil.rmtree(bench.work, ignore_errors=True)
    apps = "; ".join(f"{x.name} at {x.at:.0f} s asking {x.ask}"
                     + (" (dynamic allocation, maxExecutors, a backlog that never drains)" if x.dynamic
                        else " (static)") for x in bench.apps)
    header = (f"Fairness benchmark, scenario {a.scenario}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
              f"({time.time() - t0:.0f} s); machine: {machine()}; stoker binary: "
              f"{stoker_binary().relative_to(bench_root())}; Spark {IMAGE}; test bed: kube-apiserver v1.37.2, "
              f"process-less kubelet. Bound: ResourceQuota of {bench.capacity} pods per namespace for both, and "
              f"for stoker a queue file of capacity {bench.capacity} executors with one queue. Applications "
              f"(times from A's SparkContext up): {apps}; all hold {bench.hold:.0f} s after the last launch.")
    text = header + "\n\n" + bench.table() + "\n"
    (out / "fairness.md").write_text(text)
    (out / "fairness-samples.json").write_text(json.dumps(bench.results, indent=1))
    print(text)


def bench_root():
    return Path(__file__).resolve().parents[2]


if __name__ == "__main__":
    main()
