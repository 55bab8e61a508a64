"""stoker against Spark's built-in Kubernetes backend, side by side, on the same test bed.

Both systems are driven by real Spark 4.2.0 drivers (pyspark): `--master k8s://...` (Spark's own
backend) and `--master spark+stoker://...` (stoker's Kubernetes backend through the plugin).
Pod times come from one independent watch on the API server, the same for both; API load from
the API server's own /metrics (apiserver_request_total).

The ramp-up part also runs, on the same bed, the bed's ceiling (`bare`: a bare client creating
copies of one of stoker's pods, nothing else) and stoker driven by a light gRPC client instead of
a Spark JVM (`rpc`, with its own ceiling `bare-rpc` that copies one of its pods): the share of
the ceiling stoker reaches by itself, apart from the driver JVM's load on the same cores.

Usage: bench_k8s.py --out DIR [--quick]
Writes DIR/k8s.md (markdown table) and DIR/k8s-samples.json. Prints the table. Asserts nothing
about timings.
"""
import argparse
import datetime
import json
import os
import platform
import re
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))


def newest_build(name):
    """target/release/NAME when it is at least as new as target/debug/NAME, else the debug one.
    The debug process kubelet burns ~10x the CPU of the release one on the shared cores."""
    release, debug = ROOT / "target" / "release" / name, ROOT / "target" / "debug" / name
    if release.exists() and (not debug.exists() or release.stat().st_mtime >= debug.stat().st_mtime):
        return release
    return debug


os.environ.setdefault("STOKER_KUBELET_BIN", str(newest_build("process-kubelet")))
from testbed import FAULT, Kubelet, Testbed, wait_until  # noqa: E402

JOBS = Path(__file__).resolve().parent / "jobs"
JAR = ROOT / "spark-plugin" / "target" / "stoker-spark-plugin.jar"
IMAGE = "apache/spark:4.2.0"
NOPROC = "bench-noproc"
PROC = "bench-proc"


def stoker_binary():
    return newest_build("stoker")


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TimedWatch:
    """Every pod event of a namespace with the time it was received. Reconnects (from the last
    resource version) if the stream breaks."""

    def __init__(self, api, namespace):
        self.api = api
        self.path = f"/api/v1/namespaces/{namespace}/pods"
        self.events = []
        self.lock = threading.Lock()
        self.closed = False
        self.rv = None
        # CPU snapshots taken by the reading thread when the k-th ADDED event arrives, for each
        # k in cpu_marks: the CPU each process used while pods were being created.
        self.cpu_marks = set()
        self.cpu_at = {}
        self.added = 0
        self.resp = self._open()
        threading.Thread(target=self._run, daemon=True).start()

    def _open(self):
        q = {"watch": "1", "timeoutSeconds": "1800", "allowWatchBookmarks": "true"}
        if self.rv:
            q["resourceVersion"] = self.rv
        req = urllib.request.Request(f"{self.api.url}{self.path}?{urllib.parse.urlencode(q)}")
        req.add_header("Authorization", f"Bearer {self.api.token}")
        return urllib.request.urlopen(req, context=self.api.ctx, timeout=1900)

    def _run(self):
        while not self.closed:
            try:
                self._read(self.resp)
            except Exception as e:  # broken stream: note it and reconnect
                if self.closed:  # close() shut the socket under the read
                    return
                print(f"[bench] watch {self.path} broke ({e!r}); reconnecting", file=sys.stderr, flush=True)
            if self.closed:
                return
            try:
                self.resp = self._open()
            except Exception as e:
                print(f"[bench] watch reconnect failed ({e!r})", file=sys.stderr, flush=True)
                time.sleep(0.5)

    def _read(self, resp):
        for line in resp:
            if not line.strip():
                continue
            t = time.time()
            ev = json.loads(line)
            o = ev.get("object") or {}
            if ev.get("type") == "ERROR":
                self.rv = None  # e.g. 410 Gone: start over from now
                return
            meta = o.get("metadata") or {}
            if meta.get("resourceVersion"):
                self.rv = meta["resourceVersion"]
            if ev.get("type") == "BOOKMARK":
                continue
            if ev.get("type") == "ADDED":
                self.added += 1
                if self.added in self.cpu_marks:
                    self.cpu_at[self.added] = cpu_snapshot()
            self.on_event(t, ev)
            status = o.get("status") if isinstance(o.get("status"), dict) else {}
            lite = {"name": meta.get("name"), "phase": status.get("phase"),
                    "deleting": bool(meta.get("deletionTimestamp"))}
            with self.lock:
                self.events.append((t, ev["type"], lite))

    def on_event(self, t, ev):
        """Called with each ADDED, MODIFIED or DELETED event (parsed) as it is read; subclasses
        keep more of it."""

    def snapshot(self):
        with self.lock:
            return list(self.events)

    def first_times(self):
        created, running = {}, {}
        for t, typ, o in self.snapshot():
            if typ == "ADDED":
                created.setdefault(o["name"], t)
            if o["phase"] == "Running" and not o["deleting"]:
                running.setdefault(o["name"], t)
        return created, running

    def close(self):
        # Closing the response under the reading thread can block; shutting the socket down
        # ends the read at once.
        import socket
        self.closed = True
        try:
            self.resp.fp.raw._sock.shutdown(socket.SHUT_RDWR)
        except Exception:
            pass


def api_requests(testbed):
    """(time, total requests, pod POSTs, dispatched requests per flow schema, requests per
    "VERB resource") from the API server's own counters."""
    api = testbed.api
    req = urllib.request.Request(f"{api.url}/metrics")
    req.add_header("Authorization", f"Bearer {api.token}")
    with urllib.request.urlopen(req, context=api.ctx, timeout=30) as r:
        text = r.read().decode()
    total = pods_post = 0.0
    flows = {}
    by_verb = {}
    for line in text.splitlines():
        if line.startswith("apiserver_flowcontrol_dispatched_requests_total{"):
            m = re.search(r'flow_schema="([^"]+)"', line)
            if m:
                flows[m.group(1)] = flows.get(m.group(1), 0.0) + float(line.rsplit(" ", 1)[1])
        if line.startswith("apiserver_request_total{"):
            value = float(line.rsplit(" ", 1)[1])
            total += value
            verb = re.search(r'verb="([^"]*)"', line)
            resource = re.search(r'resource="([^"]*)"', line)
            key = f"{verb.group(1) if verb else '?'} {resource.group(1) if resource else '-'}"
            by_verb[key] = by_verb.get(key, 0.0) + value
            if 'verb="POST"' in line and 'resource="pods"' in line:
                pods_post += value
    return time.time(), total, pods_post, flows, by_verb


def requests_delta(a, b):
    """Requests per "VERB resource" between two api_requests() readings, the largest first,
    those that did not move left out."""
    out = {k: v - a[4].get(k, 0.0) for k, v in b[4].items()}
    return {k: round(v) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 1}


# Process names (as /proc/PID/comm shows them, 15 characters at most) -> component.
COMPONENTS = {"etcd": "etcd", "kube-apiserver": "kube-apiserver", "kube-controller": "kube-controller-manager",
              "kube-scheduler": "kube-scheduler", "process-kubelet": "process kubelet", "stoker": "stoker",
              "java": "Spark driver JVM"}


def cpu_snapshot():
    """(time, {pid: (component, cpu seconds)}, machine busy seconds) from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    procs = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        procs[pid] = (COMPONENTS.get(comm, "other"), (int(fields[11]) + int(fields[12])) / tick)
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    busy = (sum(cpu) - cpu[3] - cpu[4]) / tick  # all but idle and iowait
    return time.time(), procs, busy


def cpu_delta(a, b):
    """CPU seconds per component between two snapshots (processes started in between count
    from zero; ones that ended in between are missed), plus the machine's busy share."""
    out = {}
    for pid, (name, secs) in b[1].items():
        prev = a[1].get(pid)
        base = prev[1] if prev and prev[0] == name else 0.0
        out[name] = out.get(name, 0.0) + max(secs - base, 0.0)
    wall = b[0] - a[0]
    return {"wall_s": wall, "machine_busy_share": (b[2] - a[2]) / (wall * (os.cpu_count() or 1)),
            "cpu_s": {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}}


# Ramp-up systems, in the order they run: Spark's backend, stoker (a Spark driver through the
# plugin), the bare client copying stoker's pod, stoker driven by a light gRPC client, the bare
# client copying that client's pod (smaller: stoker builds it from a minimal template).
SYSTEMS = ("spark", "stoker", "stoker-warm", "bare", "bare-h2", "bare-watch", "rpc", "bare-rpc")
BARE_OF = {"bare": "stoker", "bare-h2": "stoker", "bare-watch": "stoker", "bare-rpc": "rpc"}
# The bare client's connections: kube's default client (HTTP/1.1, a connection per create in
# flight), or stoker's own (HTTP/2, one connection) for bare-h2.
BARE_CLIENT = {"bare": "kube", "bare-h2": "stoker", "bare-watch": "stoker", "bare-rpc": "kube"}


def bare_pod(pod):
    """One of stoker's executor pods as a bare client's template: the same spec, unbound (the
    scheduler places it as it placed stoker's), with a label of its own instead of stoker's and
    Spark's, so that no stoker takes it for one of its executors."""
    spec = dict(pod["spec"])
    spec.pop("nodeName", None)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"labels": {"bench": "bare"}}, "spec": spec}


class Bench:
    def __init__(self, out, quick, sizes=None, only=None, systems=SYSTEMS, rounds=1):
        self.systems = systems
        self.rounds = rounds
        self.bare_templates = {}  # system (stoker, rpc) -> one of the pods its ramp created
        self.out = Path(out)
        self.quick = quick
        self.sizes = sizes
        self.only = only
        self.work = Path(tempfile.mkdtemp(prefix="stoker-bench-"))
        self.rows = []
        self.samples = {}
        self.procs = []

    # ---- set-up ----
    def start(self):
        (self.work / "kubelets").mkdir(parents=True, exist_ok=True)
        self.testbed = Testbed(self.work / "testbed").start()
        import pyspark
        spark_home = Path(pyspark.__file__).resolve().parent
        self.noproc = Kubelet(self.testbed, self.work / "kubelets", NOPROC, mode="no-process",
                              max_pods=20000, extra=("--cpu", "100000", "--memory", "100000Gi")).start()
        self.proc_kubelet = Kubelet(self.testbed, self.work / "kubelets", PROC, spark_home=spark_home,
                                    extra=("--cpu", "16", "--memory", "64Gi")).start()
        _, self.stoker_port = self.start_stoker("bench", self.testbed.client_env())  # stopped in stop()

    def start_stoker(self, instance, env):
        port = free_port()
        log = open(self.work / f"stoker-{instance}.log", "w")
        p = subprocess.Popen(
            # --auth none (loopback): the benchmark's drivers carry no Kubernetes token, and its
            # per-system API load is counted by a FlowSchema on stoker's own ServiceAccount. With
            # --auth kubernetes the API server classifies impersonated requests by the
            # impersonated user (API Priority and Fairness runs after the impersonation filter),
            # so pod writes would count against the drivers' ServiceAccounts instead.
            [str(stoker_binary()), "serve", "--backend", "kubernetes", "--auth", "none",
             "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{free_port()}",
             "--work-dir", str(self.work / f"stoker-{instance}"), "--lease-ttl", "10s", "--delete-grace", "3s",
             "--kube-image", IMAGE, "--kube-instance", instance, "--kube-qps", "0",
             "--kube-create-concurrency", "64", "--log-format", "json"],
            stdout=log, stderr=subprocess.STDOUT,
            # The writer's debug lines (`create slot taken`, `pod created`) time a ramp's creates
            # as stoker sent them and the API server answered them: the client-side rate.
            env={**env, "RUST_LOG": env.get("RUST_LOG", "info,stoker_k8s::writer=debug")})
        self.procs.append(p)
        import socket

        def listening():
            if p.poll() is not None:
                raise AssertionError(f"stoker exited ({p.returncode}); see {log.name}")
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0
        wait_until(listening, 60, "stoker to listen")
        return p, port

    def identity(self, name):
        """A ServiceAccount `name` (cluster-admin) with a kubeconfig of its own, and a FlowSchema
        of the same name that matches only its requests: the API server's priority-and-fairness
        metrics then count what this client sends apart from everyone else (kubelet, scheduler,
        controllers, this benchmark)."""
        api = self.testbed.api
        path = self.work / f"{name}.kubeconfig"
        if path.exists():
            return path
        api.create("/api/v1/namespaces/default/serviceaccounts",
                   {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})
        api.create("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": "default"}]})
        token = api.create(f"/api/v1/namespaces/default/serviceaccounts/{name}/token", {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"expirationSeconds": 86400}})["status"]["token"]
        api.create("/apis/flowcontrol.apiserver.k8s.io/v1/flowschemas", {
            "apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "FlowSchema", "metadata": {"name": name},
            "spec": {"priorityLevelConfiguration": {"name": "workload-high"}, "matchingPrecedence": 800,
                     "distinguisherMethod": {"type": "ByUser"},
                     "rules": [{"subjects": [{"kind": "ServiceAccount",
                                              "serviceAccount": {"name": name, "namespace": "default"}}],
                                "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"],
                                                   "clusterScope": True, "namespaces": ["*"]}],
                                "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}]}]}})
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": name,
            "clusters": [{"name": "testbed", "cluster": {"server": f"https://127.0.0.1:{self.testbed.port}",
                                                         "certificate-authority": self.testbed.env["CA_CERT"]}}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": name, "context": {"cluster": "testbed", "user": name}}]}))
        return path

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()  # stoker deletes nothing on SIGTERM; namespaces are dropped anyway
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
        for name in ("proc_kubelet", "noproc", "testbed"):
            part = getattr(self, name, None)
            if part is not None:
                part.stop()

    def namespace(self, name):
        api = self.testbed.api
        api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        wait_until(lambda: api.get_opt(f"/api/v1/namespaces/{name}/serviceaccounts/default"), 60,
                   f"service account in {name}")
        return name

    def drop_namespace(self, name):
        api = self.testbed.api
        # Spark's own backend leaves pods behind when its driver is killed; remove everything.
        api.delete(f"/api/v1/namespaces/{name}")
        wait_until(lambda: api.get_opt(f"/api/v1/namespaces/{name}") is None, 300, f"namespace {name} gone")

    # ---- drivers ----
    def master(self, system):
        if system == "spark":
            return f"k8s://https://127.0.0.1:{self.testbed.port}"
        return f"spark+stoker://127.0.0.1:{self.stoker_port}"

    def conf(self, namespace, node):
        return ["--conf", f"spark.kubernetes.namespace={namespace}",
                "--conf", f"spark.kubernetes.container.image={IMAGE}",
                "--conf", f"spark.kubernetes.node.selector.kubernetes.io/hostname={node}",
                "--conf", f"spark.executorEnv.PYSPARK_PYTHON={sys.executable}"]

    def env(self):
        env = self.testbed.client_env()
        env.update(STOKER_PLUGIN_JAR=str(JAR), SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable,
                   PYSPARK_DRIVER_PYTHON=sys.executable)
        env.pop("SPARK_HOME", None)
        return env

    def hold_driver(self, system, n, namespace, node=NOPROC, light=False, master=None, env=None, extra=(),
                    stdin=None):
        stop_file = self.work / f"stop-{namespace}-{time.monotonic_ns()}"
        log = open(self.work / f"driver-{namespace}-{time.monotonic_ns()}.log", "w")
        p = subprocess.Popen([sys.executable, str(JOBS / "hold.py"), master or self.master(system), "--executors", str(n),
                              "--stop-file", str(stop_file), *(["--light"] if light else []),
                              *self.conf(namespace, node), *extra],
                             stdin=stdin, stdout=subprocess.PIPE, stderr=log, text=True, env=env or self.env())
        self.procs.append(p)
        return p, stop_file

    @staticmethod
    def wait_ready(p, timeout=180):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                raise AssertionError(f"driver exited ({p.poll()}) before it was ready")
            if line.startswith("{"):
                ev = json.loads(line)
                if ev.get("event") == "ready":
                    return ev
        raise AssertionError("driver not ready in time")

    @staticmethod
    def end_driver(p, stop_file):
        stop_file.touch()
        try:
            p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    # ---- 1. ramp-up ----
    def client_timed(self, offset):
        """From stoker's log after byte `offset`: (pods, seconds) of the application with the
        most creates, from its first `create slot taken` to its last `pod created`."""
        first, last, count = {}, {}, {}
        with open(self.work / "stoker-bench.log", "rb") as f:
            f.seek(offset)
            for raw in f:
                if b"create slot taken" not in raw and b"pod created" not in raw:
                    continue
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                app, message = line.get("app"), line.get("message")
                t = datetime.datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()
                if message == "create slot taken":
                    first.setdefault(app, t)
                elif message == "pod created":
                    last[app] = t
                    count[app] = count.get(app, 0) + 1
        if not count:
            return None
        app = max(count, key=count.get)
        return count[app], last[app] - first[app]

    def ramp(self, system, n, round_=0):
        """`system` spark or stoker: a Spark driver asks for n executors. `rpc`: one light gRPC
        client (bench_scale.App: register, ask for n, read the stream, heartbeat) asks stoker for
        n, with no JVM beside stoker. `bare` / `bare-rpc`: the bed's ceiling, a bare client
        (`stoker-bench bare-create`: the kube client stoker uses, 64 creates in flight like
        stoker's --kube-create-concurrency, no rate limiter, nothing else) creates n copies of a
        pod stoker created in its `stoker` / `rpc` ramp."""
        if system in BARE_OF and BARE_OF[system] not in self.bare_templates:
            raise AssertionError(f"{system} copies a pod of {BARE_OF[system]}'s ramp: run {BARE_OF[system]} first")
        ns = self.namespace(f"ramp-{system}-{n}")
        watch = TimedWatch(self.testbed.api, ns)
        # stoker-warm: a Spark driver that is up, with 1 executor, before it asks for n more; the
        # ramp is those n (ADDED events 2 to n + 1).
        warm = system == "stoker-warm"
        first_mark, last_mark = (2, n + 1) if warm else (1, n)
        watch.cpu_marks = {first_mark, last_mark}
        m0 = api_requests(self.testbed)
        c0 = cpu_snapshot()
        log_offset = (self.work / "stoker-bench.log").stat().st_size
        client = None  # (pods, seconds) as the creating client timed them
        t_launch = time.time()
        p = stop = light = None
        if system in BARE_OF:
            template = self.work / f"{system}-pod.json"
            template.write_text(json.dumps(self.bare_templates[BARE_OF[system]]))
            bare = subprocess.run(
                [str(newest_build("stoker-bench")), "bare-create", "--pod", str(template), "--namespace", ns,
                 "--count", str(n), "--concurrency", "64", "--client", BARE_CLIENT[system],
                 # As many connections as stoker's writes use.
                 "--connections", os.environ.get("STOKER_KUBE_WRITE_CONNECTIONS", "4"),
                 # bare-watch: and a watch of its pods beside the creates, as a controller has.
                 *(["--watch"] if system == "bare-watch" else [])],
                capture_output=True, text=True, env=self.testbed.client_env(), timeout=900)
            if bare.returncode != 0:
                raise AssertionError(f"bare-create failed ({bare.returncode}): {bare.stderr[-2000:]}")
            said = json.loads(bare.stdout.strip().splitlines()[-1])
            client = (said["created"], said["seconds"])
        elif system == "rpc":
            # Creation fairness: a small application asks for 1 executor when a quarter of this
            # ramp's pods exist (its namespace and watch made before the ramp starts).
            small_ns = self.namespace(f"ramp-small-{n}")
            small_watch = TimedWatch(self.testbed.api, small_ns)
            light = self.light_driver(n, ns)
        elif warm:
            p, stop = self.hold_driver("stoker", 1, ns, extra=("--then", str(n + 1)), stdin=subprocess.PIPE)
            self.wait_ready(p)
            wait_until(lambda: len(watch.first_times()[1]) >= 1, 300, "the warm driver's first executor Running",
                       interval=0.2)
            log_offset = (self.work / "stoker-bench.log").stat().st_size
            p.stdin.write("go\n")
            p.stdin.flush()
        else:
            p, stop = self.hold_driver(system, n, ns)
            self.wait_ready(p)

        small = None
        if system == "rpc":
            wait_until(lambda: len(watch.first_times()[0]) >= n // 4, 300, f"{n // 4} pods of the ramp created",
                       interval=0.05)
            small = self.light_driver(1, small_ns, prefix=small_ns)
            t_small = time.time()  # its request returned: stoker has its executor to create
            wait_until(lambda: small_watch.first_times()[0], 300, "the small application's pod created",
                       interval=0.05)

        def all_running():
            created, running = watch.first_times()
            return len(running) >= n + (1 if warm else 0)
        wait_until(all_running, 900, f"{n} pods Running ({system})", interval=0.5)
        m1 = api_requests(self.testbed)
        cpu = cpu_delta(c0, cpu_snapshot())
        created, running = watch.first_times()
        c, r = sorted(created.values()), sorted(running.values())
        if warm:  # the executor it had before it asked
            c, r = c[1:], r[1:]
        first = c[0]
        if system not in BARE_OF:
            client = self.client_timed(log_offset) if system != "spark" else None
        sample = {
            "system": system, "n": n, "round": round_ + 1,
            # The creating client's own clock: first create sent → last create answered (stoker:
            # its writer's debug lines; a bare client: its own timer). The watch's figures below
            # add the delivery of each ADDED event to the benchmark's (Python) watch.
            "client_creation_rate_per_s": client[0] / max(client[1], 1e-9) if client else None,
            "client_creates_s": client[1] if client else None,
            "first_pod_to_n_created_s": c[n - 1] - first,
            "first_pod_to_n_running_s": r[n - 1] - first,
            "driver_launch_to_n_running_s": r[n - 1] - t_launch,
            # Over the whole window (driver launch to all Running), all clients together.
            "apiserver_requests_per_s": (m1[1] - m0[1]) / (m1[0] - m0[0]),
            "apiserver_requests": m1[1] - m0[1],
            "pod_creates": m1[2] - m0[2],
            "creation_rate_per_s": (n - 1) / max(c[n - 1] - first, 1e-9),
            # The steady part of the ramp: from the 10th to the 90th percentile pod.
            "creation_rate_10_90_per_s": (int(n * 0.9) - int(n * 0.1)) / max(c[int(n * 0.9)] - c[int(n * 0.1)], 1e-9)
            if n >= 20 else None,
            "apiserver_requests_by_verb": requests_delta(m0, m1),
            "pods_created": len(created),
            "cpu": cpu,
            # Only while the pods were being created (the watch's first ADDED to its n-th): what
            # shared the cores with the API server then.
            "cpu_creating": cpu_delta(watch.cpu_at[first_mark], watch.cpu_at[last_mark])
            if {first_mark, last_mark} <= set(watch.cpu_at) else None,
        }
        if system in BARE_OF.values() or warm:
            # limit=1: no need to list 2,000 pods for one. stoker-warm's pods are stoker's.
            [one] = self.testbed.api.get(f"/api/v1/namespaces/{ns}/pods", limit="1")["items"]
            self.bare_templates["stoker" if warm else system] = bare_pod(one)
            sample["pod_json_bytes"] = len(json.dumps(one["spec"]))
        if p is not None:
            self.end_driver(p, stop)
        if small is not None:
            [t_pod] = small_watch.first_times()[0].values()
            ramp_times = sorted(created.values())
            sample["small_app"] = {
                "request_to_pod_created_s": t_pod - t_small,
                "ramp_pods_created_at_request": sum(1 for t in ramp_times if t <= t_small),
                "ramp_pods_created_before_its_pod": sum(1 for t in ramp_times if t <= t_pod),
                # First come, first served would create it after every pod the ramp had asked
                # for before it: the ramp's last creation, measured in this run.
                "fcfs_request_to_pod_created_s": ramp_times[n - 1] - t_small,
            }
            app, beats = small
            beats.stop()
            app.unregister()
            app.close()
            small_watch.close()
            self.drop_namespace(small_ns)
        if light is not None:
            app, beats = light
            sample["rpc_exited_events"] = len(app.exited())
            beats.stop()
            app.unregister()
            app.close()
        watch.close()
        self.drop_namespace(ns)
        return sample

    def light_driver(self, n, ns, prefix=None):
        """One light application on stoker (bench_scale's client), asking for n executors on
        the process-less node; returned with its heartbeat thread (the lease is 10 s)."""
        from bench_scale import App, Heartbeats  # bench_scale imports this module: not at the top
        app = App(self.stoker_port, 0, n, prefix=prefix or ns, namespace=ns, node=NOPROC)
        app.register()
        beats = Heartbeats([app])
        app.request(n)
        return app, beats

    # ---- 2. failure replacement ----
    def failures(self, system, count, executors=5):
        ns = self.namespace(f"fail-{system}")
        watch = TimedWatch(self.testbed.api, ns)
        p, stop = self.hold_driver(system, executors, ns)
        self.wait_ready(p)
        wait_until(lambda: len(watch.first_times()[1]) >= executors, 300, "executors running", interval=0.3)
        latencies = []
        api = self.testbed.api
        for i in range(count):
            # A running pod that is not being replaced or deleted.
            pods = [x for x in api.pods(ns) if (x.get("status") or {}).get("phase") == "Running"
                    and not x["metadata"].get("deletionTimestamp")]
            if not pods:
                wait_until(lambda: [x for x in api.pods(ns) if (x.get("status") or {}).get("phase") == "Running"],
                           120, "a running pod")
                continue
            victim = pods[0]["metadata"]["name"]
            known = set(watch.first_times()[0])
            api.annotate_pod(victim, FAULT, f"exit:{10 + i % 100}", ns=ns)

            def failed_at():
                for t, typ, o in watch.snapshot():
                    if o["name"] == victim and o["phase"] == "Failed":
                        return t
                return None
            t_failed = wait_until(failed_at, 60, f"pod {victim} Failed", interval=0.05)

            def replacement_at():
                created = watch.first_times()[0]
                new = [t for name, t in created.items() if name not in known]
                return min(new) if new else None
            t_new = wait_until(replacement_at, 120, f"a replacement for {victim}", interval=0.05)
            latencies.append(t_new - t_failed)
            # Back at full strength before the next failure.
            wait_until(lambda: len([x for x in api.pods(ns) if (x.get("status") or {}).get("phase") == "Running"
                                    and not x["metadata"].get("deletionTimestamp")]) >= executors,
                       120, "full strength again", interval=0.1)
        self.end_driver(p, stop)
        watch.close()
        self.drop_namespace(ns)
        lat = sorted(latencies)
        return {"system": system, "failures": len(lat),
                "p50_s": statistics.median(lat),
                "p99_s": lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))],
                "latencies_s": lat}

    # ---- 3. API server load in steady state ----
    def api_rate(self, window, flow):
        """(requests/s of all clients, requests/s of flow schema `flow`) over `window` seconds."""
        a = api_requests(self.testbed)
        time.sleep(window)
        b = api_requests(self.testbed)
        dt = b[0] - a[0]
        return (b[1] - a[1]) / dt, (b[3].get(flow, 0.0) - a[3].get(flow, 0.0)) / dt

    def api_load(self, system, apps, window):
        """Steady state of `apps` applications with 2 executors each. The system under test runs
        under an identity of its own (Spark's drivers, or a stoker started for this part), so the
        API server counts its requests apart: that rate per application is the figure."""
        ns = self.namespace(f"load-{system}-{apps}")
        flow = f"bench-{system}"
        kubeconfig = self.identity(flow)
        env = self.env()
        env["KUBECONFIG"] = str(kubeconfig)
        server = master = None
        drivers = []
        if system == "stoker":
            server, port = self.start_stoker(f"load-{apps}", env)
            master = f"spark+stoker://127.0.0.1:{port}"
        try:
            time.sleep(5)
            baseline, _ = self.api_rate(window, flow)
            # In waves of 5: 50 JVMs starting at once on 2 cores starve each other, and Spark's
            # Kubernetes client gives up after its 10 s connection timeout.
            for first in range(0, apps, 5):
                wave = [self.hold_driver(system, 2, ns, light=True, master=master, env=env)
                        for _ in range(first, min(first + 5, apps))]
                drivers += wave
                for p, _ in wave:
                    self.wait_ready(p, timeout=600)
            api = self.testbed.api
            wait_until(lambda: len([x for x in api.pods(ns) if (x.get("status") or {}).get("phase") == "Running"])
                       >= 2 * apps, 600, "all executor pods running", interval=1)
            time.sleep(5)
            rate, own = self.api_rate(window, flow)
            for p, stop in drivers:
                stop.touch()
            for p, stop in drivers:
                self.end_driver(p, stop)
        finally:
            for p, _ in drivers:  # after a failure: no driver may outlive its part
                if p.poll() is None:
                    p.kill()
                    p.wait()
            if server is not None:
                server.terminate()
                server.wait(timeout=30)
        self.drop_namespace(ns)
        return {"system": system, "apps": apps, "window_s": window, "rate_per_s": rate,
                "baseline_per_s": baseline, "per_app_per_s": (rate - baseline) / apps,
                "own_per_s": own, "own_per_app_per_s": own / apps}

    # ---- 6. real executors ----
    def real(self, system):
        ns = self.namespace(f"real-{system}")
        out = subprocess.run([sys.executable, str(JOBS / "timed_shuffle.py"), self.master(system), "--executors", "4",
                              *self.conf(ns, PROC)], capture_output=True, text=True, env=self.env(), timeout=900)
        self.drop_namespace(ns)
        result = next((json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")), None)
        if not result:
            raise AssertionError(f"shuffle job failed ({system}): {out.stderr[-3000:]}")
        return {"system": system, "correct": result["correct"],
                "first_task_s": (result["t_first_task"] or result["t_done"]) - result["t_start"],
                "total_s": result["t_done"] - result["t_start"]}

    # ---- all ----
    def attempt(self, part, what, fn, *args):
        """Runs one measurement; a failure is recorded (and shown in the table) instead of
        ending the whole run."""
        print(f"[bench] {what}", file=sys.stderr, flush=True)
        try:
            self.samples.setdefault(part, []).append(fn(*args))
        except Exception as e:  # noqa: BLE001 - reported in the table and the samples
            print(f"[bench] {what} FAILED: {e!r}", file=sys.stderr, flush=True)
            self.samples.setdefault("errors", []).append(f"{what}: {e!r}")

    def run(self):
        sizes = self.sizes or ([100] if self.quick else [100, 500, 2000])
        failures = 20 if self.quick else 100
        app_counts = [1, 5] if self.quick else [1, 10, 50]
        window = 35 if self.quick else 95  # Spark's drivers LIST every 30 s
        self.samples["ramp"] = []
        if self.only == "load":
            sizes = []
        for n in sizes:
            for r in range(self.rounds):
                # Later rounds alternate the order, so that no system always runs on a fresher
                # or a fuller bed (etcd grows with every ramp); the first one makes the bare
                # clients' templates.
                for system in self.systems if r % 2 == 0 else reversed(self.systems):
                    self.attempt("ramp", f"ramp-up {system} N={n} round {r + 1}/{self.rounds}",
                                 self.ramp, system, n, r)
        if self.only == "ramp":
            return
        for system in ("spark", "stoker") if self.only is None else ():
            self.attempt("failures", f"failure replacement {system} x{failures}", self.failures, system, failures)
        for apps in app_counts:
            for system in ("spark", "stoker"):
                self.attempt("api_load", f"API load {system} apps={apps}", self.api_load, system, apps, window)
        for system in ("spark", "stoker") if self.only is None else ():
            self.attempt("real", f"real executors {system}", self.real, system)

    def ceiling_table(self):
        """Each ramp system's pod creations/s over all rounds, timed two ways (the benchmark's
        watch, the creating client's own clock), as median (min–max), and each system against
        its bare client: the ratio of the medians and the range of the per-round ratios."""
        ramp = self.samples.get("ramp", [])
        out = []
        for n in sorted({x["n"] for x in ramp}):
            by = {}
            for x in ramp:
                if x["n"] == n:
                    by.setdefault(x["system"], []).append(x)
            if not any(system in BARE_OF for system in by):
                continue
            rounds = max(len(v) for v in by.values())
            out += ["", f"Ramp-up N={n}, the bed's ceiling: pod creations/s, median (min–max) of {rounds} round(s)",
                    "", "| system | watch-timed (first → all ADDED) | client-timed (first create sent → last answered) "
                        "| CPU seconds while creating (median; first → all ADDED) |",
                    "|---|---|---|---|"]

            def spread(xs, key):
                v = [x[key] for x in xs if x.get(key)]
                if not v:
                    return "", None
                return f"{statistics.median(v):.0f} ({min(v):.0f}–{max(v):.0f})", statistics.median(v)

            def creating_cpu(xs):
                """Median CPU seconds per process while the pods were being created."""
                per = {}
                for x in xs:
                    for k, v in ((x.get("cpu_creating") or {}).get("cpu_s") or {}).items():
                        per.setdefault(k, []).append(v)
                top = sorted(((statistics.median(v), k) for k, v in per.items()), reverse=True)
                return ", ".join(f"{k} {v:.1f}" for v, k in top if v >= 0.5)
            medians = {}
            for system in (x for x in SYSTEMS if x in by):
                watch, medians[(system, "w")] = spread(by[system], "creation_rate_per_s")
                client, medians[(system, "c")] = spread(by[system], "client_creation_rate_per_s")
                out.append(f"| {system} | {watch} | {client} | {creating_cpu(by[system])} |")
            out += ["", "| system ÷ bare client | watch-timed: ratio of medians (per-round range) | client-timed |",
                    "|---|---|---|"]
            for system, ceiling in (("stoker", "bare"), ("stoker", "bare-h2"), ("stoker", "bare-watch"),
                                    ("stoker-warm", "bare"), ("stoker-warm", "bare-h2"),
                                    ("stoker-warm", "bare-watch"), ("rpc", "bare-rpc")):
                if system not in by or ceiling not in by:
                    continue
                cells = []
                for key, kind in (("creation_rate_per_s", "w"), ("client_creation_rate_per_s", "c")):
                    a, b = medians.get((system, kind)), medians.get((ceiling, kind))
                    per_round = [x[key] / y[key] for x, y in zip(sorted(by[system], key=lambda x: x["round"]),
                                                                  sorted(by[ceiling], key=lambda x: x["round"]))
                                 if x.get(key) and y.get(key)]
                    cells.append(f"{a / b:.2f}× ({min(per_round):.2f}–{max(per_round):.2f})" if a and b and per_round
                                 else "")
                out.append(f"| {system} ÷ {ceiling} | {cells[0]} | {cells[1]} |")
        return out

    def table(self):
        s = self.samples
        lines = ["| benchmark | figure | Spark built-in | stoker | stoker vs built-in |",
                 "|---|---|---|---|---|"]

        def pair(items, key):
            d = {x["system"]: x for x in items}
            return d.get("spark"), d.get("stoker")

        def fig(x, key, fmt="{:.2f}"):
            return fmt.format(x[key]) if x else "not run"

        def ratio(a, b, key):
            return f"{a[key] / max(b[key], 1e-9):.1f}× faster" if a and b else ""

        def cpu(x):
            if not x:
                return "not run"
            top = ", ".join(f"{k} {v:.0f}" for k, v in x["cpu"]["cpu_s"].items() if v >= 1 and k != "other")
            return f"{top}; machine {100 * x['cpu']['machine_busy_share']:.0f}% busy"

        for n in sorted({x["n"] for x in s["ramp"]}):
            sp, st = pair([x for x in s["ramp"] if x["n"] == n], None)
            for key, label in (("first_pod_to_n_created_s", "first pod → all created (s)"),
                               ("first_pod_to_n_running_s", "first pod → all Running (s)"),
                               ("driver_launch_to_n_running_s", "driver launch → all Running (s)")):
                lines.append(f"| ramp-up N={n} | {label} | {fig(sp, key)} | {fig(st, key)} | {ratio(sp, st, key)} |")
            lines.append(f"| ramp-up N={n} | pod creations/s (first → all created) | "
                         f"{fig(sp, 'creation_rate_per_s', '{:.0f}')} | {fig(st, 'creation_rate_per_s', '{:.0f}')} | |")
            by = {x["system"]: x for x in s["ramp"] if x["n"] == n}

            def of(x, ceiling):
                return f"{x['creation_rate_per_s'] / max(ceiling['creation_rate_per_s'], 1e-9):.2f}×"
            for key, what in (("bare", "the bed's ceiling: a bare client's pod creations/s (kube's default client, "
                                       "HTTP/1.1, 64 in flight, no limiter, copies of stoker's pod"),
                              ("bare-h2", "the same bare client on stoker's own client (HTTP/2, as many connections "
                                          "as stoker's writes"),
                              ("bare-watch", "bare-h2 with a watch of its pods beside the creates, as a controller "
                                             "such as stoker has")):
                ceiling = by.get(key)
                if not ceiling:
                    continue
                shares = ", ".join(f"{name} {of(x, ceiling)}" for name, x in (("stoker", st), ("Spark", sp)) if x)
                lines.append(f"| ramp-up N={n} | {what}; first → all created {ceiling['first_pod_to_n_created_s']:.2f} s, "
                             f"all Running {ceiling['first_pod_to_n_running_s']:.2f} s) | "
                             f"{ceiling['creation_rate_per_s']:.0f} | {ceiling['creation_rate_per_s']:.0f} | "
                             f"{shares} of it |")
            rpc, bare_rpc = by.get("rpc"), by.get("bare-rpc")
            if rpc:
                lines.append(f"| ramp-up N={n} | stoker driven by a light gRPC client (no Spark JVM): pod creations/s; "
                             f"first → all created {rpc['first_pod_to_n_created_s']:.2f} s, all Running "
                             f"{rpc['first_pod_to_n_running_s']:.2f} s; {cpu(rpc)} | | "
                             f"{rpc['creation_rate_per_s']:.0f} | "
                             + (f"{of(rpc, bare_rpc)} of a bare client copying its pod "
                                f"({bare_rpc['creation_rate_per_s']:.0f}/s, {bare_rpc['first_pod_to_n_created_s']:.2f} s; "
                                f"pod spec {rpc['pod_json_bytes']} bytes of JSON, Spark's "
                                f"{st['pod_json_bytes'] if st else '?'})" if bare_rpc else "") + " |")
                small = rpc.get("small_app")
                if small:
                    lines.append(f"| ramp-up N={n} | creation fairness: a second light application asks for 1 executor "
                                 f"during rpc's ramp ({small['ramp_pods_created_at_request']} of its {n} pods "
                                 f"created): its request → its pod created (s); first come, first served would "
                                 f"put it after the ramp's last pod (measured in the same run) | "
                                 f"{small['fcfs_request_to_pod_created_s']:.2f} (FCFS, from this run) | "
                                 f"{small['request_to_pod_created_s']:.2f} (after "
                                 f"{small['ramp_pods_created_before_its_pod']} of the ramp's pods) | "
                                 f"{small['fcfs_request_to_pod_created_s'] / max(small['request_to_pod_created_s'], 1e-9):.0f}× sooner |")
            lines.append(f"| ramp-up N={n} | API server requests/s over the window (all clients) | "
                         f"{fig(sp, 'apiserver_requests_per_s', '{:.0f}')} | {fig(st, 'apiserver_requests_per_s', '{:.0f}')} | |")
            lines.append(f"| ramp-up N={n} | API server requests in the window (all clients); of them POST pods (creates + scheduler bindings) | "
                         f"{fig(sp, 'apiserver_requests', '{:.0f}')}, {fig(sp, 'pod_creates', '{:.0f}')} | "
                         f"{fig(st, 'apiserver_requests', '{:.0f}')}, {fig(st, 'pod_creates', '{:.0f}')} | |")
            lines.append(f"| ramp-up N={n} | CPU seconds in the window, by process | {cpu(sp)} | {cpu(st)} | |")
        for err in s.get("errors", []):
            lines.append(f"| failed | {err} | | | |")
        lines += self.ceiling_table()
        sp, st = pair(s.get("failures", []), None)
        for key, label in (("p50_s", "p50"), ("p99_s", "p99")) if sp and st else ():
            lines.append(f"| failure → replacement created ({sp['failures']} failures) | {label} (s) | "
                         f"{sp[key]:.3f} | {st[key]:.3f} | {sp[key] / max(st[key], 1e-9):.1f}× faster |")
        for apps in sorted({x["apps"] for x in s.get("api_load", [])}):
            sp, st = pair([x for x in s["api_load"] if x["apps"] == apps], None)
            if not (sp and st):
                continue
            lines.append(f"| API load, {apps} app(s) × 2 executors, steady state ({sp['window_s']} s) | requests/s per app "
                         f"sent by the system (its own identity, API server's flow-control counters) | "
                         f"{sp['own_per_app_per_s']:.3f} | {st['own_per_app_per_s']:.3f} | |")
            lines.append(f"| API load, {apps} app(s) × 2 executors | all clients: requests/s per app above the idle rate "
                         f"measured just before (Spark {sp['baseline_per_s']:.2f}/s, stoker {st['baseline_per_s']:.2f}/s) | "
                         f"{sp['per_app_per_s']:.2f} | {st['per_app_per_s']:.2f} | |")
        sp, st = pair(s.get("real", []), None)
        if not (sp and st):
            return "\n".join(lines)
        lines.append(f"| shuffle job, 4 real executors | time to first task (s) | {sp['first_task_s']:.1f} | "
                     f"{st['first_task_s']:.1f} | {sp['first_task_s'] / st['first_task_s']:.2f}× |")
        lines.append(f"| shuffle job, 4 real executors | total (s), answer correct: {sp['correct']}/{st['correct']} | "
                     f"{sp['total_s']:.1f} | {st['total_s']:.1f} | {sp['total_s'] / st['total_s']:.2f}× |")
        return "\n".join(lines)


def machine():
    model = ""
    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        mem = next(l.split(":", 1)[1].strip() for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPUs ({model}), {mem} RAM, {platform.platform()}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", help="ramp-up sizes, e.g. 500,2000 (default: 100, or 100,500,2000)")
    ap.add_argument("--only", choices=["ramp", "load"], help="run only the ramp-up or the API-load part")
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help="ramp-up only: which systems to run, in this order: spark, stoker, stoker-warm (a Spark "
                         "driver that is up with 1 executor before it asks for N more), bare (the bed's "
                         "ceiling, copies a pod of stoker's ramp), bare-h2 (on stoker's client), bare-watch "
                         "(and a watch of its pods), rpc (stoker driven by a light gRPC client), bare-rpc "
                         "(copies a pod of rpc's ramp); default all")
    ap.add_argument("--rounds", type=int, default=1,
                    help="ramp-up only: run the systems this many times, every other round in reverse "
                         "order; the ceiling table gives each system's median and range")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(x) for x in a.sizes.split(",")] if a.sizes else None
    chosen = {x for x in a.systems.split(",") if x}
    if not chosen or not chosen <= set(SYSTEMS):
        ap.error(f"--systems takes {', '.join(SYSTEMS)}, got {a.systems!r}")
    systems = tuple(x for x in SYSTEMS if x in chosen)
    for bare, of in BARE_OF.items():
        if bare in systems and of not in systems and not (of == "stoker" and "stoker-warm" in systems):
            ap.error(f"--systems {bare} copies a pod of {of}'s ramp: give {of} too")
    if systems != SYSTEMS and a.only != "ramp":
        ap.error("--systems needs --only ramp (the other parts compare both systems)")
    if a.rounds < 1 or (a.rounds > 1 and a.only != "ramp"):
        ap.error("--rounds takes a count of 1 or more, and more than 1 needs --only ramp")
    bench = Bench(out, a.quick, sizes, a.only, systems, a.rounds)
    try:
        bench.start()
        bench.run()
    finally:
        bench.stop()
    header = (f"Kubernetes benchmarks ({'quick' if a.quick else 'full'} mode), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
              f"machine: {machine()}; stoker binary: {stoker_binary().relative_to(ROOT)} (--kube-qps 0, "
              f"create concurrency 64); process kubelet: {os.environ['STOKER_KUBELET_BIN']}; "
              f"Spark {IMAGE} defaults (allocation batch size 20 in 4.2); "
              f"test bed: kube-apiserver v1.37.2, process-less kubelet for ramp/failure/load.")
    text = header + "\n\n" + bench.table() + "\n"
    name = f"k8s-{a.only}" if a.only else "k8s"
    (out / f"{name}.md").write_text(text)
    (out / f"{name}-samples.json").write_text(json.dumps(bench.samples, indent=1))
    print(text)


if __name__ == "__main__":
    main()
