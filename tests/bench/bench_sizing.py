"""Five runs of a job that needs more heap than it is given, with the same sizing key: stoker
(resizing on, sizes remembered in a ConfigMap) against Spark's built-in Kubernetes backend, on
the same test bed (issue 14).

The job (--job heap, the default) is tests/e2e/jobs/heap_hog.py: spark.executor.memory=512m, one
executor, two tasks that each build a 600 MiB string in the executor's heap; a 512m executor dies
of OutOfMemoryError (exit code 52). --job python is tests/e2e/jobs/python_hog.py: the same
executor, two tasks that each hold 650 MiB in a PySpark Python worker, outside the heap; the
896 MiB container goes over its limit and the kubelet OOM-kills it (137). Real executor JVMs run on the process kubelet (bench_k8s.py's test bed, image,
namespace-per-system and confs for its "spark" system). Per run:

* executor failures before success: executor pods of the application whose container ended
  with a non-zero exit code on its own (not after the pod's deletion began); "job failed" when
  the driver did not finish with the right answer;
* job wall time: driver process launch to exit;
* memory GiB-seconds provisioned: over the application's executor pods, the pod's memory limit
  (sum over its containers) times its lifetime (ADDED to DELETED, as one pod watch receives them).

Usage: bench_sizing.py --out DIR [--runs N] [--quick] [--job heap|python]   (--quick: 3 runs per system)
Writes DIR/sizing.md (the table) and DIR/sizing-samples.json; drivers' logs under DIR/logs.
Prints the table. Asserts nothing about the figures.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# bench_k8s picks the kubelet binary and puts tests/e2e on sys.path.
from bench_k8s import IMAGE, PROC, Bench, TimedWatch, machine, stoker_binary  # noqa: E402
from testbed import wait_until  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
JOBS_DIR = ROOT / "tests" / "e2e" / "jobs"
# --job: (script, MiB per task, what each task holds, for the table's header).
JOBS = {
    "heap": (JOBS_DIR / "heap_hog.py", 600, "MiB string in the heap"),
    "python": (JOBS_DIR / "python_hog.py", 650, "MiB in a PySpark Python worker (outside the heap)"),
}
TASKS = 2
SIZES_CONFIGMAP = "default/stoker-sizes-bench"
SYSTEMS = (("stoker", "stoker"), ("spark", "Spark built-in"))


class PodWatch(TimedWatch):
    """bench_k8s's TimedWatch (reconnecting, timed), also keeping each pod object whole:
    `pods` holds (time received, event type, pod)."""

    def __init__(self, api, namespace):
        self.pods = []
        super().__init__(api, namespace)

    def on_event(self, t, ev):
        with self.lock:
            self.pods.append((t, ev["type"], ev["object"]))

    def of_app(self, app_id):
        with self.lock:
            return [(t, typ, o) for t, typ, o in self.pods
                    if (o["metadata"].get("labels") or {}).get("spark-app-selector") == app_id]


def mib(quantity):
    """A memory quantity in MiB."""
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024 ** 2, "k": 1e3 / 2 ** 20, "M": 1e6 / 2 ** 20,
             "G": 1e9 / 2 ** 20}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    return float(quantity) / 2 ** 20


def limit_mib(pod):
    return sum(mib(((c.get("resources") or {}).get("limits") or {}).get("memory", "0"))
               for c in pod["spec"]["containers"])


def failed_on_its_own(events):
    """Exit codes of pods that ended with a non-zero code before anyone deleted them."""
    codes = {}
    for _, _, o in events:
        if o["metadata"].get("deletionTimestamp"):
            continue
        for c in (o.get("status") or {}).get("containerStatuses") or []:
            code = ((c.get("state") or {}).get("terminated") or {}).get("exitCode")
            if code:
                codes[o["metadata"]["name"]] = code
    return codes


class SizingBench(Bench):
    def __init__(self, out, runs, job="heap"):
        super().__init__(out, quick=False)
        self.runs = runs
        self.job = job
        self.script, self.mib, _ = JOBS[job]
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.results = {system: [] for system, _ in SYSTEMS}

    def start(self):
        # bench_k8s's stoker (--auth none, its test bed and kubelets); sizes remembered across
        # runs in a ConfigMap (outside a pod stoker remembers nothing without one).
        os.environ["STOKER_SIZES_CONFIGMAP"] = SIZES_CONFIGMAP
        super().start()

    def run_once(self, system, ns, watch, i, key):
        sizing = ["--conf", f"spark.stoker.sizing.key={key}"] if system == "stoker" else []
        log = self.logs / f"{system}-{i}.log"
        t0 = time.time()
        try:
            out = subprocess.run(
                [sys.executable, str(self.script), self.master(system), "--mib", str(self.mib), "--tasks", str(TASKS),
                 *self.conf(ns, PROC), *sizing],
                stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=self.env(), timeout=900)
            code, stdout = out.returncode, out.stdout
        except subprocess.TimeoutExpired as e:
            code, stdout = "timeout", e.stdout or ""
        t1 = time.time()
        events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        result = next((e for e in events if e["event"] == "result"), None)
        app_id = next((e["app_id"] for e in events if e["event"] == "started"), None)
        if app_id is None:  # the driver never got going: its pods tell the application
            ids = {(o["metadata"].get("labels") or {}).get("spark-app-selector")
                   for t, _, o in watch.pods if t >= t0}
            app_id = next(iter(ids - {None}), None)
        ok = code == 0 and bool(result) and result["lengths"] == [self.mib * 2 ** 20] * TASKS
        # Every pod of the application gone (as the watch saw it), or 120 s; leftovers are deleted
        # and counted up to now.
        def gone():
            ev = watch.of_app(app_id)
            names = {o["metadata"]["name"] for _, _, o in ev}
            return names == {o["metadata"]["name"] for _, typ, o in ev if typ == "DELETED"}
        left = []
        try:
            wait_until(gone, 120, f"{system} run {i}'s executor pods deleted", interval=0.5)
        except AssertionError:
            for p in self.testbed.api.pods(ns, labelSelector=f"spark-app-selector={app_id}"):
                left.append(p["metadata"]["name"])
                self.testbed.api.delete_pod(p["metadata"]["name"], ns, force=True)
        end = time.time()
        pods = {}
        failures = failed_on_its_own(watch.of_app(app_id))
        for t, typ, o in watch.of_app(app_id):
            name = o["metadata"]["name"]
            p = pods.setdefault(name, {"name": name, "added": t, "deleted": None, "limit_mib": limit_mib(o),
                                       "exit_code": failures.get(name)})
            if typ == "DELETED":
                p["deleted"] = t
        gib_s = sum(p["limit_mib"] / 1024 * ((p["deleted"] or end) - p["added"]) for p in pods.values())
        # Each pod's life relative to the driver's launch (s), for the samples.
        lives = [{**p, "added": round(p["added"] - t0, 2), "deleted": round((p["deleted"] or end) - t0, 2)}
                 for p in pods.values()]
        sample = {"system": system, "run": i, "app_id": app_id, "ok": ok, "driver_exit": code,
                  "wall_s": t1 - t0, "executor_failures": len(failures), "exit_codes": sorted(failures.values()),
                  "pods": len(pods), "limits_mib": sorted({round(p["limit_mib"]) for p in pods.values()}),
                  "memory_gib_s": gib_s, "left_behind": left, "log": str(log), "pod_lives": lives}
        print(f"[bench-sizing] {system} run {i}: {json.dumps(sample)}", file=sys.stderr, flush=True)
        return sample

    def run(self):
        for system, _ in SYSTEMS:
            ns = self.namespace(f"sizing-{system}")
            watch = PodWatch(self.testbed.api, ns)
            key = f"{self.job}-hog-{int(time.time())}"
            try:
                for i in range(1, self.runs + 1):
                    print(f"[bench-sizing] {system} run {i}/{self.runs}", file=sys.stderr, flush=True)
                    self.results[system].append(self.run_once(system, ns, watch, i, key))
            finally:
                watch.close()
                self.drop_namespace(ns)

    def table(self):
        def failures(s):
            codes = ", ".join(f"{s['exit_codes'].count(c)}× code {c}" for c in sorted(set(s["exit_codes"]), reverse=True))
            if s["ok"]:
                return f"{s['executor_failures']} ({codes})" if codes else "0"
            return f"job failed (executor exits: {codes or 'none'})"

        def figures(samples, key, fmt):
            values = [s[key] for s in samples]
            if len(values) == 1:
                return fmt.format(values[0])
            return (f"mean {fmt.format(statistics.mean(values))} "
                    f"({', '.join(fmt.format(v) for v in values)})")

        later = f"runs 2–{self.runs}"
        lines = ["| system | runs | executor failures before success | job wall time (s; to the failure for a failed job) | "
                 "memory GiB·s provisioned | executor pod limits (MiB) |",
                 "|---|---|---|---|---|---|"]
        for system, label in SYSTEMS:
            samples = self.results[system]
            for what, part in (("run 1", samples[:1]), (later, samples[1:])):
                if not part:
                    continue
                limits = sorted({m for s in part for m in s["limits_mib"]})
                counted = {}
                for s in part:
                    counted[failures(s)] = counted.get(failures(s), 0) + 1
                told = "; ".join(f"{n} runs: {f}" if n > 1 and len(counted) > 1 else f for f, n in counted.items())
                if len(counted) == 1 and len(part) > 1:
                    told = f"each: {told}"
                lines.append(f"| {label} | {what} | {told} | "
                             f"{figures(part, 'wall_s', '{:.1f}')} | {figures(part, 'memory_gib_s', '{:.1f}')} | "
                             f"{', '.join(map(str, limits))} |")
        st, sp = self.results["stoker"], self.results["spark"]
        for what, a, b in (("run 1", st[:1], sp[:1]), (later, st[1:], sp[1:])):
            if a and b:
                wall = statistics.mean(s["wall_s"] for s in a) / statistics.mean(s["wall_s"] for s in b)
                mem = statistics.mean(s["memory_gib_s"] for s in a) / max(
                    statistics.mean(s["memory_gib_s"] for s in b), 1e-9)
                lines.append(f"| stoker ÷ built-in | {what} | | {wall:.2f}× | {mem:.2f}× | |")
        return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", type=int, help="runs per system (default 5; --quick: 3)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--job", choices=sorted(JOBS), default="heap",
                    help="heap: heap_hog.py (OutOfMemoryError); python: python_hog.py (container OOM kill)")
    a = ap.parse_args()
    runs = a.runs or (3 if a.quick else 5)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    bench = SizingBench(out, runs, a.job)
    started = time.time()
    try:
        bench.start()
        bench.run()
    finally:
        bench.stop()
    header = (f"Sizing benchmark ({runs} runs per system, same spark.stoker.sizing.key for stoker), "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.time() - started:.0f} s in all; "
              f"machine: {machine()}; stoker binary: {stoker_binary().relative_to(ROOT)} (resize defaults: "
              f"factor 1.5; sizes in ConfigMap {SIZES_CONFIGMAP}); process kubelet: "
              f"{os.environ['STOKER_KUBELET_BIN']}; Spark {IMAGE} defaults for the built-in backend; job: "
              f"{bench.script.name}, spark.executor.memory=512m, 1 executor, {TASKS} tasks × {bench.mib} {JOBS[a.job][2]}.")
    text = header + "\n\n" + bench.table() + "\n"
    (out / "sizing.md").write_text(text)
    (out / "sizing-samples.json").write_text(json.dumps(bench.results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
