"""A fault matrix on the Kubernetes test bed: stoker's Kubernetes backend under faults, with the
loss figures that must stay at zero.

Each case is one function that runs one ramp (a real Spark 4.2.0 driver, tests/bench/jobs/hold.py,
asking stoker for N executors, on a process-less kubelet) with one fault in the middle of it, and
returns one row of figures. `main` runs the matrix and prints a table; a non-zero loss figure (or
a run that did not finish) makes it exit non-zero. Case f waits for the whole ramp before its
fault (the pods must exist to be adopted); cases g, h, i and j run a real shuffle job
(tests/chaos/job.py) on real executors (process kubelets) through their faults and check the
job's answer (case i: the node its executors run on is lost mid-job; case j: two stoker replicas
with leader election, the leader SIGKILLed mid-job, the standby takes over).

Ground truth is the API server, not stoker: a pods watch of our own (straight to the API server,
not through the fault proxy) records every ADDED pod per (stoker.dev/app-id annotation,
spark-exec-id label); a second pod for one executor id is a duplicate. What stoker believes comes
from `stoker executors <app>` (admin token); what the driver was told comes from the plugin's
INFO log in the driver's stderr ("stoker: executor N exited ...").

Usage: chaos.py [--quick] [--runs R] [--n N] [--cases a,b,c,d,e,f,g,h,i,j] [--out DIR]
"""
import argparse
import base64
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import leader_pair  # noqa: E402
from testbed import ApiError, Kubelet, Testbed, wait_until  # noqa: E402

STOKER = Path(os.environ.get("STOKER_BIN", ROOT / "target" / "debug" / "stoker"))
JAR = Path(os.environ.get("STOKER_PLUGIN_JAR", ROOT / "spark-plugin" / "target" / "stoker-spark-plugin.jar"))
HOLD = ROOT / "tests" / "bench" / "jobs" / "hold.py"
JOB = Path(__file__).resolve().parent / "job.py"
IMAGE = "apache/spark:4.2.0"
NODE = "chaos-noproc"
PROC_NODE = "chaos-proc"  # the process kubelet's node: case g's executors are real JVMs
CLAIM_N = 200  # case f: executors adopted while stoker is killed
JOB_N = 3  # cases g, h, i and j: real executors
POOL = "stoker.dev/chaos-pool"  # case i: the node label its driver selects
LEASE_TTL_S = 10
DELETE_GRACE_S = 3
# The API server serves pods without its watch cache on the chaos test bed: a watch that resumes
# from a resource version then goes to etcd, so compacting etcd turns the resume into 410 Gone (with
# the cache, the resume is served from the cache's 75 s of history and never expires).
TESTBED_ARGS = ["--apiserver-arg=--watch-cache-sizes=pods#0"]


def log(msg):
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait_log(path, offset, needle, timeout, proc=None, interval=0.005):
    """Reads `path` from byte `offset` on as it grows until a line holding `needle` appears;
    returns (that line, the monotonic time it was seen). Polls every `interval` s (reading only
    what is new), so a caller can act within milliseconds of the line."""
    deadline = time.monotonic() + timeout
    buf = b""
    with open(path, "rb") as f:
        f.seek(offset)
        while True:
            chunk = f.read()
            if chunk:
                buf += chunk
                lines = buf.split(b"\n")
                buf = lines.pop()
                for line in lines:
                    text = line.decode(errors="replace")
                    if needle in text:
                        return text, time.monotonic()
            elif proc is not None and proc.poll() is not None:
                raise AssertionError(f"process exited ({proc.returncode}) before {needle!r} in {path}")
            elif time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {needle!r} in {path}")
            else:
                time.sleep(interval)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- a TCP proxy between stoker and the API server ---------------------------------------------

class FaultProxy:
    """127.0.0.1 only. Forwards bytes unchanged (TLS passes through: the API server's certificate is
    for 127.0.0.1). `blackhole()` stops forwarding and keeps every socket open (new connections are
    accepted and held); `heal()` resumes; `drop()` resets every open connection. At most
    `max_conns` connections at once (more are refused), two threads per connection."""

    def __init__(self, upstream_port, max_conns=128):
        self.upstream = ("127.0.0.1", upstream_port)
        self.flowing = threading.Event()
        self.flowing.set()
        self.lock = threading.Lock()
        self.conns = set()
        self.max_conns = max_conns
        self.closed = False
        self.accepted = 0
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    def _accept(self):
        while not self.closed:
            try:
                down, _ = self.server.accept()
            except OSError:
                return
            with self.lock:
                if len(self.conns) >= self.max_conns:
                    down.close()
                    continue
                self.conns.add(down)
                self.accepted += 1
            threading.Thread(target=self._serve, args=(down,), daemon=True).start()

    def _serve(self, down):
        up = None
        try:
            # Blackholed: the connection is held until healed (bounded: the proxy's lifetime).
            while not self.flowing.wait(1.0):
                if self.closed:
                    return
            up = socket.create_connection(self.upstream, timeout=10)
            up.settimeout(None)
            with self.lock:
                if down not in self.conns:  # dropped meanwhile
                    return
                self.conns.add(up)
            t = threading.Thread(target=self._pump, args=(up, down), daemon=True)
            t.start()
            self._pump(down, up)
            t.join(timeout=600)
        except OSError:
            pass
        finally:
            for s in (down, up):
                if s is not None:
                    self._close(s)

    def _pump(self, src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                # Blackholed: what was read is held here (one chunk), nothing more is read.
                while not self.flowing.wait(1.0):
                    if self.closed:
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _close(self, s, reset=False):
        with self.lock:
            self.conns.discard(s)
        try:
            if reset:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            s.close()
        except OSError:
            pass

    def blackhole(self):
        self.flowing.clear()

    def heal(self):
        self.flowing.set()

    def drop(self):
        """Resets every open connection (both sides)."""
        with self.lock:
            conns = list(self.conns)
        for s in conns:
            self._close(s, reset=True)
        return len(conns)

    def close(self):
        self.closed = True
        self.flowing.set()
        try:
            self.server.close()
        except OSError:
            pass
        self.drop()


# ---- ground truth: a pods watch of our own -----------------------------------------------------

class PodWatch:
    """Every pod event of one namespace, straight from the API server. Reconnects from the last
    resource version; after a 410 it lists again, records the pods it had not seen as ADDED and
    the pods it holds live that the list lacks as DELETED (`gaps` counts those re-lists: a pod
    born and gone inside one would be missed)."""

    def __init__(self, api, namespace):
        self.api = api
        self.path = f"/api/v1/namespaces/{namespace}/pods"
        self.events = []  # (t, type, uid, app, exec_id, phase, deleting)
        self.cond = threading.Condition()
        self.closed = False
        self.gaps = 0
        self.seen = set()
        # Kept as events arrive, so that the waits below cost O(1) per event, not a pass over
        # every event so far (10,000 pods made that quadratic).
        self.live = set()  # uids whose last event is not DELETED
        self.owner = {}  # uid: (app, exec id)
        self.n_added = 0
        self.rv = None
        self.resp = None
        self._list()
        self.resp = self._open()
        self.thread = threading.Thread(target=self._run, daemon=True, name="pod-watch")
        self.thread.start()

    def _list(self):
        out = self.api.get(self.path)
        self.rv = out["metadata"]["resourceVersion"]
        for p in out["items"]:
            self._record("ADDED", p)
        listed = {p["metadata"]["uid"] for p in out["items"]}
        with self.cond:
            gone = self.live - listed
        for uid in gone:
            app, eid = self.owner[uid]
            self._append((time.monotonic(), "DELETED", uid, app, eid, None, True))

    def _open(self):
        q = {"watch": "1", "timeoutSeconds": "1800", "resourceVersion": self.rv}
        req = urllib.request.Request(f"{self.api.url}{self.path}?{urllib.parse.urlencode(q)}")
        req.add_header("Authorization", f"Bearer {self.api.token}")
        return urllib.request.urlopen(req, context=self.api.ctx, timeout=1900)

    def _record(self, typ, o):
        meta = o.get("metadata") or {}
        uid = meta.get("uid")
        if typ == "ADDED" and uid in self.seen:
            return
        self.seen.add(uid)
        status = o.get("status") if isinstance(o.get("status"), dict) else {}
        ev = (time.monotonic(), typ, uid, (meta.get("annotations") or {}).get("stoker.dev/app-id"),
              (meta.get("labels") or {}).get("spark-exec-id"), status.get("phase"),
              bool(meta.get("deletionTimestamp")))
        self._append(ev)

    def _append(self, ev):
        typ, uid = ev[1], ev[2]
        with self.cond:
            self.owner[uid] = (ev[3], ev[4])
            self.events.append(ev)
            self.n_added += typ == "ADDED"
            if typ == "DELETED":
                self.live.discard(uid)
            else:
                self.live.add(uid)
            self.cond.notify_all()

    def _run(self):
        attempts = 0
        while not self.closed and attempts < 100:
            try:
                for line in self.resp:
                    if not line.strip():
                        continue
                    ev = json.loads(line)
                    o = ev.get("object") or {}
                    if ev.get("type") == "ERROR":
                        if o.get("code") == 410:
                            self.gaps += 1
                            self._list()
                        break
                    rv = (o.get("metadata") or {}).get("resourceVersion")
                    if rv:
                        self.rv = rv
                    if ev.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                        self._record(ev["type"], o)
            except Exception as e:  # noqa: BLE001 - broken stream: reconnect
                if not self.closed:
                    log(f"ground-truth watch broke ({e!r}); reconnecting")
            if self.closed:
                return
            attempts += 1
            try:
                self.resp = self._open()
            except Exception as e:  # noqa: BLE001
                log(f"ground-truth watch reconnect failed ({e!r})")
                time.sleep(0.5)

    def snapshot(self):
        with self.cond:
            return list(self.events)

    def added(self):
        """{(app, exec id): [uid, ...]} of every pod ever ADDED."""
        out = {}
        for _, typ, uid, app, eid, _, _ in self.snapshot():
            if typ == "ADDED":
                out.setdefault((app, eid), []).append(uid)
        return out

    def state(self):
        """{uid: (app, exec id, phase, deleting, gone)} as last seen."""
        out = {}
        for _, typ, uid, app, eid, ph, deleting in self.snapshot():
            out[uid] = (app, eid, ph, deleting, typ == "DELETED")
        return out

    def first_deletion(self):
        """Time of the first pod deletion seen (deletionTimestamp or DELETED), or None."""
        for t, typ, _, _, _, _, deleting in self.snapshot():
            if deleting or typ == "DELETED":
                return t
        return None

    def wait_added(self, count, timeout, proc=None):
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.n_added < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {count} pods")
                if proc is not None and proc.poll() is not None:
                    raise AssertionError(f"driver exited ({proc.returncode}) before {count} pods existed")
                self.cond.wait(min(left, 0.5))

    def wait_gone(self, deadline, uids=None):
        """Waits (on the watch, until the monotonic `deadline`) for every pod it has seen (or
        those of `uids`) to be DELETED; True when none is left."""
        with self.cond:
            while self.live if uids is None else self.live & uids:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.cond.wait(min(remaining, 1.0))
        return True

    def close(self):
        self.closed = True
        try:
            self.resp.fp.raw._sock.shutdown(socket.SHUT_RDWR)
        except Exception:  # noqa: BLE001
            pass
        self.thread.join(timeout=10)


# ---- stoker, drivers ---------------------------------------------------------------------------

class ChaosStoker:
    """stoker with --backend kubernetes whose API server is the fault proxy. `name` (default: the
    instance) names its work dir and log; `extra`: more `stoker serve` flags."""

    def __init__(self, work, instance, kubeconfig, qps, burst, name=None, extra=()):
        self.work = work
        self.instance = instance
        self.kubeconfig = kubeconfig
        self.port = free_port()
        name = name or instance
        self.work_dir = work / f"stoker-{name}"
        self.log_path = work / f"stoker-{name}.log"
        self.qps, self.burst = qps, burst
        self.extra = list(extra)
        self.proc = None

    @property
    def address(self):
        """What a driver's master URL names (spark+stoker://ADDRESS)."""
        return f"127.0.0.1:{self.port}"

    def start(self):
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        # The writer's debug lines say when a create that was retried found its pod already there
        # (the first attempt reached etcd, its answer was lost): cases e and g count them.
        env.setdefault("RUST_LOG", "info,stoker_k8s::writer=debug")
        self.proc = subprocess.Popen(
            # --auth none (loopback only): drivers carry no Kubernetes token; pods are written
            # with the kubeconfig's (admin) identity.
            [str(STOKER), "serve", "--backend", "kubernetes", "--auth", "none",
             "--listen", f"127.0.0.1:{self.port}", "--metrics-listen", f"127.0.0.1:{free_port()}",
             "--work-dir", str(self.work_dir), "--lease-ttl", f"{LEASE_TTL_S}s",
             "--delete-grace", f"{DELETE_GRACE_S}s", "--kube-image", IMAGE,
             "--kube-instance", self.instance, "--kube-qps", str(self.qps),
             "--kube-burst", str(self.burst), "--kube-create-concurrency", "64", *self.extra],
            stdout=open(self.log_path, "a"), stderr=subprocess.STDOUT, env=env)
        wait_until(self._started, 60, "stoker to listen")
        return self

    def _started(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"stoker exited ({self.proc.returncode}): {self.log()[-3000:]}")
        return self.port_open()

    def port_open(self):
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_size(self):
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, offset):
        """The log from byte `offset` on."""
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def executors(self, app_id):
        """{exec id: (state, deleting)} as stoker reports them, or None if it cannot answer."""
        try:
            out = subprocess.run([str(STOKER), "executors", app_id, "--server", f"http://127.0.0.1:{self.port}",
                                  "--work-dir", str(self.work_dir)], capture_output=True, text=True, timeout=20)
        except subprocess.TimeoutExpired:
            return None
        if out.returncode != 0:
            return None
        lines = out.stdout.splitlines()
        if not lines:
            return None
        header = lines[0]
        cols = {name: header.index(name) for name in ("EXECUTOR", "STATE", "HOST", "DELETING", "MEMORY")}
        rows = {}
        for line in lines[1:]:
            if not line.strip() or line.startswith("profile "):
                continue
            eid = line[:cols["STATE"]].split()[0]
            state = line[cols["STATE"]:cols["HOST"]].strip()
            deleting = line[cols["DELETING"]:cols["MEMORY"]].strip() == "yes"
            rows[eid] = (state, deleting)
        return rows

    def kill9(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


class ChaosReplica(ChaosStoker):
    """A ChaosStoker started with --leader-elect (tests/e2e/leader_pair.py): a standby does not
    listen on its gRPC port, so it has started once its log says it stands by until it holds the
    Lease."""

    def __init__(self, work, instance, kubeconfig, qps, burst, identity):
        super().__init__(work, instance, kubeconfig, qps, burst, name=f"{instance}-{identity}",
                         extra=leader_pair.args(identity))
        self.identity = identity

    def _started(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"stoker exited ({self.proc.returncode}): {self.log()[-3000:]}")
        return self.first(leader_pair.STANDING_BY) is not None

    def first(self, text):
        """Its first log line holding `text`, or None."""
        return next((line for line in self.log().splitlines() if text in line), None)


class ReplicaPair:
    """Case j: two replicas of one instance (a Lease, tests/e2e/leader_pair.py), both through the
    fault proxy; the driver is given both addresses. Stands in for the run's ChaosStoker: what the
    harness asks of "stoker" (executors, log) goes to the replica that leads; the case sets
    `leader` when the standby has taken over."""

    def __init__(self, work, instance, kubeconfig, qps, burst):
        self.instance = instance
        self.replicas = [ChaosReplica(work, instance, kubeconfig, qps, burst, identity)
                         for identity in ("replica-a", "replica-b")]
        self.leader, self.standby = self.replicas

    @property
    def address(self):
        return ",".join(r.address for r in self.replicas)

    def start(self):
        try:
            leader_pair.start_pair(*self.replicas)
        except Exception:
            self.stop()
            raise
        return self

    def executors(self, app_id):
        return self.leader.executors(app_id)

    def log(self):
        return self.leader.log()

    def log_size(self):
        return self.leader.log_size()

    def stop(self):
        for r in self.replicas:
            r.stop()


def log4j2(work):
    path = work / "log4j2-driver.properties"
    if not path.exists():
        path.write_text("\n".join([
            "rootLogger.level = warn",
            "rootLogger.appenderRef.stderr.ref = console",
            "appender.console.type = Console",
            "appender.console.name = console",
            "appender.console.target = SYSTEM_ERR",
            "appender.console.layout.type = PatternLayout",
            "appender.console.layout.pattern = %d{HH:mm:ss.SSS} %p %c{1}: %m%n%ex",
            "logger.stoker.name = org.apache.spark.scheduler.cluster.stoker",
            "logger.stoker.level = info", ""]))
    return path


EXITED = re.compile(r"stoker: executor (\d+) exited [^(]*\(([A-Z_0-9]+)\)")


class HoldDriver:
    """tests/bench/jobs/hold.py: a real Spark driver that asks for n executors and holds them."""

    script = HOLD
    node = NODE

    def __init__(self, work, address, namespace, n, jar=JAR, extra=(), selector=None):
        """`address`: stoker's (several, comma-separated, for replicas); `selector`: the executors'
        node selector (default: this class's node)."""
        selector = selector or {"kubernetes.io/hostname": self.node}
        self.stop_file = work / f"stop-{namespace}"
        self.log_path = work / f"driver-{namespace}.log"
        self.out_path = work / f"driver-{namespace}.out"
        env = dict(os.environ)
        env.update(STOKER_PLUGIN_JAR=str(jar), SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable,
                   PYSPARK_DRIVER_PYTHON=sys.executable)
        env.pop("SPARK_HOME", None)
        self.proc = subprocess.Popen(
            [sys.executable, str(self.script), f"spark+stoker://{address}", "--executors", str(n),
             "--stop-file", str(self.stop_file), "--max-seconds", "1200", *extra,
             "--conf", f"spark.kubernetes.namespace={namespace}",
             "--conf", f"spark.kubernetes.container.image={IMAGE}",
             *(a for k, v in selector.items() for a in ("--conf", f"spark.kubernetes.node.selector.{k}={v}")),
             "--conf", f"spark.executorEnv.PYSPARK_PYTHON={sys.executable}",
             # The plugin's INFO lines (terminal events of executors stoker deleted or lost are
             # INFO) pass PySpark's default WARN threshold only for a logger configured on its own.
             "--conf", f"spark.driver.extraJavaOptions=-Dlog4j2.configurationFile=file:{log4j2(work)}"],
            stdout=open(self.out_path, "w"), stderr=open(self.log_path, "w"), env=env, start_new_session=True)

    def event(self, name):
        """The first JSON line the driver printed with this event, or None."""
        for line in self.out_path.read_text().splitlines():
            if line.startswith("{"):
                ev = json.loads(line)
                if ev.get("event") == name:
                    return ev
        return None

    def wait_event(self, name, timeout, pred=None):
        def check():
            for line in self.out_path.read_text().splitlines():
                if line.startswith("{"):
                    ev = json.loads(line)
                    if ev.get("event") == name and (pred is None or pred(ev)):
                        return ev
            if self.proc.poll() is not None:
                raise AssertionError(f"driver exited ({self.proc.returncode}) before {name}: {self.log()[-3000:]}")
            return None
        return wait_until(check, timeout, f"the driver's {name} event", interval=0.2)

    def ready(self, timeout=240):
        return self.wait_event("ready", timeout)

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def exited(self):
        """{exec id: reason} of every terminal event the plugin logged."""
        return {m.group(1): m.group(2) for m in EXITED.finditer(self.log())}

    def stop(self, timeout=120):
        self.stop_file.touch()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill9()

    def kill9(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


class JobDriver(HoldDriver):
    """tests/chaos/job.py: a real shuffle job with a known answer on real executors (the process
    kubelet's node), then holds them until told to stop."""
    script = JOB
    node = PROC_NODE


def spark_home():
    """The Spark installation of the pyspark package (the process kubelet runs executors from it,
    standing in for the image's /opt/spark)."""
    import pyspark
    return Path(pyspark.__file__).resolve().parent


# ---- the harness -------------------------------------------------------------------------------

class Harness:
    def __init__(self, work=None, n=500, qps=50, blackhole_s=30, watch_cache=False):
        self.work = Path(work or tempfile.mkdtemp(prefix="stoker-chaos-"))
        self.n = n
        self.qps = qps
        self.blackhole_s = blackhole_s
        self.watch_cache = watch_cache
        self.runs = 0
        self.testbed = self.kubelet = self.proc_kubelet = None
        self.jar = JAR

    def start(self):
        global STOKER
        assert STOKER.exists(), f"{STOKER} missing: cargo build --bins"
        assert JAR.exists(), f"{JAR} missing: run scripts/setup.sh"
        (self.work / "kubelets").mkdir(parents=True, exist_ok=True)
        # A copy: a concurrent `mvn package` must not swap the jar under a starting driver.
        self.jar = self.work / JAR.name
        shutil.copy2(JAR, self.jar)
        # The same for stoker: a concurrent `cargo build` must not swap it between two restarts.
        copy = self.work / "bin" / "stoker"
        copy.parent.mkdir(exist_ok=True)
        shutil.copy2(STOKER, copy)
        STOKER = copy
        extra = os.environ.get("STOKER_TESTBED_ARGS", "")
        os.environ["STOKER_TESTBED_ARGS"] = " ".join([extra, *([] if self.watch_cache else TESTBED_ARGS)]).strip()
        try:
            self.testbed = Testbed(self.work / "testbed").start()
        finally:
            os.environ["STOKER_TESTBED_ARGS"] = extra
        self.api = self.testbed.api
        self.kubelet = Kubelet(self.testbed, self.work / "kubelets", NODE, mode="no-process", max_pods=20000,
                               extra=("--cpu", "100000", "--memory", "100000Gi")).start()
        return self

    def process_kubelet(self):
        """The process kubelet (cases g, h, i and j), started on first use."""
        if self.proc_kubelet is None:
            self.proc_kubelet = Kubelet(self.testbed, self.work / "kubelets", PROC_NODE,
                                        spark_home=spark_home()).start()
        return self.proc_kubelet

    def stop(self):
        for k in (self.proc_kubelet, self.kubelet):
            if k:
                k.stop()
        if self.testbed:
            self.testbed.stop()

    # -- pieces --
    def kubeconfig(self, proxy_port, name):
        path = self.work / f"{name}.kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "chaos",
            "clusters": [{"name": "proxy", "cluster": {"server": f"https://127.0.0.1:{proxy_port}",
                                                       "certificate-authority": self.testbed.env["CA_CERT"]}}],
            "users": [{"name": "admin", "user": {"token": self.testbed.env["ADMIN_TOKEN"]}}],
            "contexts": [{"name": "chaos", "context": {"cluster": "proxy", "user": "admin"}}]}))
        return path

    def namespace(self, name):
        self.api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        wait_until(lambda: self.api.get_opt(f"/api/v1/namespaces/{name}/serviceaccounts/default"), 60,
                   f"service account in {name}")
        return name

    def live_pods(self, ns):
        """{exec id: pod} of pods neither deleting nor ended."""
        out = {}
        for p in self.api.pods(ns):
            if p["metadata"].get("deletionTimestamp"):
                continue
            if (p.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                continue
            out[p["metadata"]["labels"].get("spark-exec-id")] = p
        return out

    def restart_apiserver(self, timeout=180):
        """SIGUSR1 to the test bed's supervisor: it SIGKILLs kube-apiserver, starts it again with
        the same arguments and waits for /readyz, then logs "kube-apiserver restarted: ... ready
        X after the kill". Returns X in seconds (the API server's outage)."""
        log_path = self.testbed.log_path
        offset = log_path.stat().st_size
        os.kill(int(self.testbed.env["TESTBED_PID"]), signal.SIGUSR1)
        line, _ = wait_log(log_path, offset, "kube-apiserver restarted:", timeout, self.testbed.proc, interval=0.05)
        m = re.search(r"ready ([0-9.]+)(ms|s) after the kill", line)
        down = (float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)) if m else None
        log(f"kube-apiserver restarted, down {down} s")
        return down

    def compact_etcd(self):
        """Compacts etcd at its current revision (its JSON gateway); returns the revision."""
        url = self.testbed.env["ETCD_URL"].rstrip("/")

        def post(path, body):
            req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        rev = int(post("/v3/kv/range", {"key": base64.b64encode(b"/").decode()})["header"]["revision"])
        post("/v3/kv/compaction", {"revision": str(rev), "physical": True})
        return rev

    # -- one run --
    def run(self, case, key, fault, kill_driver=False, check=None, n=None, job=False, fault_at=None,
            selector=None, final=None, stoker=ChaosStoker):
        """One ramp with `fault(ctx)` injected once a third of the pods exist. `fault` returns the
        monotonic time the fault ended (recovery is measured from there). A run that failed
        before its fault was injected (e.g. the driver JVM did not start) is set-up trouble, not
        a finding: it is run once more, and counted in `setup_retries`. `check(ctx)` runs before
        the driver is stopped, `final(ctx)` after it stopped and the leak was counted. `stoker`
        makes the run's stoker from (work, instance, kubeconfig, qps, burst), as ChaosStoker does
        (case j: a ReplicaPair of two replicas)."""
        args = (case, key, fault, kill_driver, check, n or self.n, job, fault_at, selector, final, stoker)
        row = self._run_once(*args)
        if "error" in row and "created_at_fault" not in row:
            log(f"{case}: failed before the fault ({row['error']}); running it once more")
            row = self._run_once(*args)
            row["setup_retries"] = 1
        return row

    def _run_once(self, case, key, fault, kill_driver, check, n, job, fault_at, selector, final, make_stoker):
        """`n` executors; the fault once `fault_at` pods exist (default a third of n). With `job`,
        the driver runs tests/chaos/job.py on the process kubelet (or on the nodes `selector`
        picks) and the row gets the `wrong_answer` figure (else n/a). A fault may put pod uids
        in ctx["not_live"] (pods its fault killed, e.g. on a lost node): their deletions are not
        counted as live pods deleted."""
        self.runs += 1
        tag = f"{key}-{self.runs}"
        ns = self.namespace(f"chaos-{tag}")
        proxy = FaultProxy(self.testbed.port)
        stoker = make_stoker(self.work, f"chaos-{tag}", self.kubeconfig(proxy.port, tag), self.qps,
                             max(1, self.qps // 10)).start()
        watch = PodWatch(self.api, ns)
        driver = None
        row = {"case": case, "n": n, "wrong_answer": None}
        try:
            if job:
                self.process_kubelet()
                driver = JobDriver(self.work, stoker.address, ns, n, self.jar, selector=selector)
            else:
                driver = HoldDriver(self.work, stoker.address, ns, n, self.jar)
            watch.wait_added(fault_at or max(1, n // 3), 300, driver.proc)
            ctx = {"stoker": stoker, "proxy": proxy, "driver": driver, "watch": watch, "ns": ns,
                   "log_offset": stoker.log_size(), "row": row, "n": n, "not_live": set()}
            row["created_at_fault"] = len(watch.added())
            log(f"{tag}: fault at {row['created_at_fault']}/{n} pods created")
            t_end = fault(ctx)
            if kill_driver:
                self._after_driver_kill(row, ns, watch, t_end)
            else:
                app_id = row["app_id"] = driver.ready()["app_id"]
                self._recover(row, ns, stoker, driver, app_id, t_end, n)
                self._judge(row, ns, stoker, driver, app_id, watch)
                if job:
                    self._answer(row, driver)
                if check is not None:
                    check(ctx)
                t_stop = time.monotonic()
                row["live_deleted"] = len({e[2] for e in watch.snapshot() if (e[6] or e[1] == "DELETED")
                                           and e[0] < t_stop and e[2] not in ctx["not_live"]})
                driver.stop()
                row["leaked"] = self._leaked(ns, watch, LEASE_TTL_S + DELETE_GRACE_S + n / self.qps + 30)
                if final is not None:
                    final(ctx)
                # Not a loss (the driver has gone), but a wrong label: stoker's own deletions at
                # the application's end reported as DELETED_EXTERNALLY "(not by stoker)" when the
                # pod's last state was not a terminated container (the process-less kubelet
                # removes pods without writing one).
                text = stoker.log()
                end = text.rfind("application unregistered")
                row["mislabelled_at_end"] = (text[end:].count("reason=DELETED_EXTERNALLY") if end >= 0 else 0)
        except Exception as e:  # noqa: BLE001 - the run counts as failed, the matrix goes on
            log(f"{tag} FAILED: {e!r}")
            row["error"] = repr(e)[:300]
        finally:
            if driver is not None and driver.proc.poll() is None:
                driver.kill9()
            added = watch.added()
            row["created"] = len(added)
            row["duplicates"] = sum(len(u) - 1 for u in added.values())
            row["watch_gaps"] = watch.gaps
            watch.close()
            stoker.stop()
            proxy.close()
            self._cleanup(ns)
        log(f"{tag}: {json.dumps({k: v for k, v in row.items() if k != 'app_id'})}")
        return row

    def _whole(self, ns, stoker, driver, app_id, n):
        """N pods live on the API server and N executors RUNNING in stoker's view."""
        if driver.proc.poll() is not None:
            raise AssertionError(f"driver exited ({driver.proc.returncode}): {driver.log()[-2000:]}")
        if len(self.live_pods(ns)) < n:
            return False
        view = stoker.executors(app_id)
        return view is not None and sum(1 for s, d in view.values() if s == "RUNNING" and not d) >= n

    def _recover(self, row, ns, stoker, driver, app_id, t_end, n):
        """Recovered: the application whole again (`_whole`)."""
        wait_until(lambda: self._whole(ns, stoker, driver, app_id, n), 300, f"{n} executors running again",
                   interval=0.5)
        row["recovery_s"] = time.monotonic() - t_end

    def _answer(self, row, driver):
        """Case g: the job's result against its known answer (groups, row count, sum of ids)."""
        res = driver.wait_event("result", 600)
        row["job_s"] = round(res["t"] - driver.event("job-start")["t"], 1)
        wrong = (res["groups"], res["count"], res["sum"]) != (res["expected_groups"], res["expected_count"],
                                                             res["expected_sum"])
        row["wrong_answer"] = int(wrong)
        if wrong:
            row["answer"] = {k: res[k] for k in ("groups", "count", "sum")}

    def _judge(self, row, ns, stoker, driver, app_id, watch):
        """Lost: an executor whose pod is not live and that the driver was never told ended
        (ids the API server ever had, and ids stoker lists). Wrong: a terminal event the driver got
        for an executor whose pod is live. Events take a moment to arrive: up to 20 s for lost to
        settle at 0."""
        def figures():
            live = set(self.live_pods(ns))
            view = stoker.executors(app_id) or {}
            exited = driver.exited()
            ever = {eid for (app, eid) in watch.added() if app == app_id}
            lost = sorted((ever | set(view)) - live - set(exited), key=int)
            wrong = sorted(set(exited) & live, key=int)
            return lost, wrong, exited
        last = [figures()]

        def settled():
            last[0] = figures()
            return not last[0][0]
        try:
            wait_until(settled, 20, "lost executors to settle at 0", interval=1)
        except AssertionError:
            pass  # the row reports what is still lost
        lost, wrong, exited = last[0]
        row["lost"], row["wrong"], row["terminal_events"] = len(lost), len(wrong), len(exited)
        reasons = {}
        for reason in exited.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        row["terminal_reasons"] = reasons
        if lost:
            row["lost_ids"] = lost[:20]
        if wrong:
            row["wrong_ids"] = wrong[:20]

    def _leaked(self, ns, watch, budget):
        """Pods left `budget` seconds after the application ended (waits on the watch, then asks
        the API server once)."""
        watch.wait_gone(time.monotonic() + budget)
        return len(self.api.pods(ns))

    def _after_driver_kill(self, row, ns, watch, t_kill):
        """Every pod (live or not) gone within the lease + delete grace, plus the time stoker's
        --kube-qps pacing needs to send N deletions, plus 15 s for the kubelet."""
        budget = LEASE_TTL_S + DELETE_GRACE_S + self.n / self.qps + 15
        row["budget_s"] = budget
        watch.wait_gone(t_kill + budget)
        left = self.api.pods(ns)
        row["leaked"] = len(left)
        if not left:
            row["recovery_s"] = time.monotonic() - t_kill
        for k in ("lost", "wrong", "live_deleted", "terminal_events"):
            row[k] = None  # not observable: the driver is gone, and stoker deletes by design

    def _cleanup(self, ns):
        try:
            for p in self.api.pods(ns):
                self.api.delete_pod(p["metadata"]["name"], ns, force=True)
            self.api.delete(f"/api/v1/namespaces/{ns}")
        except (ApiError, OSError) as e:
            log(f"cleanup of {ns}: {e!r}")

    # ---- the cases ----
    def case_stoker_kill(self):
        """(a) stoker SIGKILLed mid-ramp, restarted on the same port, instance and work dir."""
        def fault(ctx):
            ctx["stoker"].kill9()
            ctx["stoker"].start()
            t = time.monotonic()
            return t
        def check(ctx):
            text = ctx["stoker"].log_since(ctx["log_offset"])
            m = re.search(r"driver re-registered: its pods are handed back.*?executors=(\d+)", text)
            ctx["row"]["adopted"] = int(m.group(1)) if m else 0
            ctx["row"]["reattached"] = "re-attached to stoker" in ctx["driver"].log()

        row = self.run("stoker SIGKILL + restart", "a", fault, check=check)
        if "error" not in row and not row.get("reattached"):
            row["error"] = "the driver did not re-attach"
        return row

    def case_blackhole(self):
        """(b) the API server unreachable for blackhole_s seconds mid-ramp (sockets held open)."""
        def fault(ctx):
            ctx["proxy"].blackhole()
            time.sleep(self.blackhole_s)  # the fault's duration is the point: no event to wait on
            ctx["proxy"].heal()
            return time.monotonic()
        return self.run(f"API server blackholed {self.blackhole_s:g} s", "b", fault)

    def case_watch_expiry(self):
        """(c) 410 Gone: stoker cut off (blackhole), the revision moved past what its watch has
        seen (two ConfigMaps written), etcd compacted at that revision, stoker's connections reset,
        the proxy healed: the watcher's resume must fail with 410 and re-list (stoker's log)."""
        marker = "pod watch: listing pods"

        def fault(ctx):
            ctx["proxy"].blackhole()
            # Two writes: the revision moves at least 2 past the last one stoker can have seen.
            # With one, a compaction at exactly that write's revision leaves stoker's resume
            # (from the revision after its last) valid, and no 410 comes (seen once in CI on a
            # quiet bed).
            path = f"/api/v1/namespaces/{ctx['ns']}/configmaps"
            self.api.create(path, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "chaos-bump"},
                                   "data": {"k": "v"}})
            self.api.create(path, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "chaos-bump-2"},
                                   "data": {"k": "v"}})
            rev = self.compact_etcd()
            dropped = ctx["proxy"].drop()
            ctx["proxy"].heal()
            log(f"compacted etcd at revision {rev}, reset {dropped} connection(s)")
            return time.monotonic()

        def check(ctx):
            text = ctx["stoker"].log_since(ctx["log_offset"])
            ctx["row"]["relisted"] = marker in text

        row = self.run("watch expiry (410): etcd compacted, connections reset", "c", fault, check=check)
        if "error" not in row and not row.get("relisted"):
            row["error"] = "no re-list in stoker's log after the 410"
        return row

    def case_driver_kill(self):
        """(d) the driver SIGKILLed mid-ramp: every pod gone within the lease (+ delete grace)."""
        def fault(ctx):
            ctx["driver"].kill9()
            return time.monotonic()
        return self.run("driver SIGKILL", "d", fault, kill_driver=True)


    def case_apiserver_restart(self):
        """(e) kube-apiserver SIGKILLed mid-ramp and started again (the test bed's supervisor, on
        SIGUSR1, same arguments, waits for /readyz). stoker's requests fail meanwhile (connection
        refused); it must resume its watch and finish the ramp with nothing lost or repeated.
        Recovery from the API server being ready again."""
        marker = "pod watch: listing pods"

        def fault(ctx):
            ctx["row"]["apiserver_down_s"] = self.restart_apiserver()
            return time.monotonic()

        def check(ctx):
            text = ctx["stoker"].log_since(ctx["log_offset"])
            ctx["row"]["relisted"] = marker in text
            count_api_restart_effects(ctx, text)
        return self.run("kube-apiserver SIGKILL + restart", "e", fault, check=check)

    def case_claim_kill(self):
        """(f) window 1 of issue 12: stoker SIGKILLed while the driver's pods are being claimed.
        The whole ramp of CLAIM_N pods first (all live, all RUNNING in stoker's view); stoker
        SIGKILLed and restarted; SIGKILLed again the moment its log says the re-registered driver's
        pods were handed back (the claim); restarted again. The last stoker must hand back every
        pod (the claim's count = N), none may be deleted or created twice (created = N).
        Recovery from the second restart."""
        n = CLAIM_N
        claim = "driver re-registered: its pods are handed back"

        def claimed(line):
            m = re.search(r"executors=(\d+)", line)
            return int(m.group(1)) if m else None

        def fault(ctx):
            st, drv, row = ctx["stoker"], ctx["driver"], ctx["row"]
            app_id = drv.ready()["app_id"]
            wait_until(lambda: self._whole(ctx["ns"], st, drv, app_id, n), 300, f"{n} executors running",
                       interval=0.5)
            st.kill9()
            t_kill = time.monotonic()
            offset = st.log_size()
            st.start()
            line, seen = wait_log(st.log_path, offset, claim, 120, st.proc)
            st.kill9()
            row["kill_after_claim_ms"] = (time.monotonic() - seen) * 1000
            row["stoker_back_s"] = seen - t_kill
            row["claims_first"] = claimed(line)
            log(f"killed stoker {row['kill_after_claim_ms']:.0f} ms after its claim ({row['claims_first']} pods)")
            ctx["log_offset"] = st.log_size()
            st.start()
            return time.monotonic()

        def check(ctx):
            row = ctx["row"]
            text = ctx["stoker"].log_since(ctx["log_offset"])
            lines = [l for l in text.splitlines() if claim in l]
            row["claims_final"] = claimed(lines[0]) if lines else 0
            row["claim_lines_final"] = len(lines)
            row["reaped"] = text.count("no application owns") + text.count("within the adoption window: deleting")
            problems = []
            if row["claims_final"] != n or len(lines) != 1:
                problems.append(f"the last stoker handed back {row['claims_final']} pods in {len(lines)} claim(s), not {n} in 1")
            if len(ctx["watch"].added()) != n:
                problems.append(f"{len(ctx['watch'].added())} executors created, not {n}")
            if problems:
                row["error"] = "; ".join(problems)
        return self.run("stoker SIGKILL at the claim of adopted pods, twice", "f", fault, check=check, n=n,
                        fault_at=n)

    def case_job(self):
        """(g) a real shuffle job (tests/chaos/job.py: 1,000,000 rows, 40 slow map partitions,
        1,000 groups) on JOB_N real executors (the process kubelet) through two faults while its
        map stage runs: stoker SIGKILLed and restarted (the driver re-registers), then
        kube-apiserver SIGKILLed and restarted. The answer must be right, every figure 0.
        Recovery from the API server being ready again."""
        n = JOB_N

        def fault(ctx):
            st, drv, row = ctx["stoker"], ctx["driver"], ctx["row"]
            # In the job: its first map task has finished (job.py reports its accumulator).
            drv.wait_event("task-done", 300, pred=lambda ev: ev["n"] >= 1)
            st.kill9()
            t_kill = time.monotonic()
            offset = st.log_size()
            st.start()
            _, seen = wait_log(st.log_path, offset, "driver re-registered", 120, st.proc, interval=0.05)
            row["stoker_back_s"] = seen - t_kill
            ctx["api_offset"] = st.log_size()
            row["apiserver_down_s"] = self.restart_apiserver()
            t = time.monotonic()
            row["faults_in_job"] = drv.event("result") is None
            return t

        def check(ctx):
            count_api_restart_effects(ctx, ctx["stoker"].log_since(ctx["api_offset"]))
        return self.run("real shuffle job: stoker SIGKILL, then kube-apiserver SIGKILL, mid-job", "g", fault,
                        check=check, n=n, job=True, fault_at=n)


    def case_job_apiserver(self):
        """(h) the same real shuffle job as (g) through one fault while its map stage runs:
        kube-apiserver SIGKILLed and restarted, stoker left running (it must ride out the API
        server's absence on its own: watch resumed, nothing created twice, no pod lost). The
        answer must be right, every figure 0. Recovery from the API server being ready again."""
        n = JOB_N

        def fault(ctx):
            drv, row = ctx["driver"], ctx["row"]
            drv.wait_event("task-done", 300, pred=lambda ev: ev["n"] >= 1)
            ctx["api_offset"] = ctx["stoker"].log_size()
            row["apiserver_down_s"] = self.restart_apiserver()
            t = time.monotonic()
            row["faults_in_job"] = drv.event("result") is None
            return t

        def check(ctx):
            text = ctx["stoker"].log_since(ctx["api_offset"])
            ctx["row"]["relisted"] = "pod watch: listing pods" in text
            count_api_restart_effects(ctx, text)
        return self.run("real shuffle job: kube-apiserver SIGKILL alone, mid-job", "h", fault,
                        check=check, n=n, job=True, fault_at=n)

    def case_node_lost(self):
        """(i) the same real shuffle job as (g) on JOB_N executors that all run on a node of their
        own (a process kubelet started for the run, the only node with the run's POOL label);
        once the job's first map task has finished that node is lost (Kubelet.lose: its
        containers die, it writes nothing more) and PROC_NODE gets the label, so replacements can
        run there. The node lifecycle controller marks the lost pods not ready; stoker must tell
        the driver NODE_LOST exactly once for each lost executor and nothing else, and create
        replacements (new ids) on PROC_NODE; the answer must be right. stoker deletes the lost pods
        (grace 0): those deletions are not counted as live pods deleted. Once the job is done the
        lost Node is deleted, as a cloud provider's node controller does for a machine that is
        gone, and every pod of it must be gone from the API server (a pod deleted with a grace
        period on a silent node stays terminating until then). Recovery: from the loss to the
        application whole again (JOB_N replacements RUNNING in stoker's view, JOB_N live pods)."""
        n = JOB_N
        case = "real shuffle job: its node lost mid-job"
        pool = f"i-{self.runs + 1}"
        doomed = Kubelet(self.testbed, self.work / "kubelets", f"chaos-lost-{self.runs + 1}", spark_home=spark_home())
        try:
            doomed.start()
            proc_node = f"/api/v1/nodes/{self.process_kubelet().node}"
        except Exception as e:  # noqa: BLE001 - the run counts as failed, the matrix goes on
            log(f"case i: a kubelet did not start: {e!r}")
            doomed.stop()
            return {"case": case, "n": n, "wrong_answer": None, "error": repr(e)[:300]}
        lost = {}  # exec id: pod uid, of the executors on the lost node

        def fault(ctx):
            drv, row = ctx["driver"], ctx["row"]
            drv.wait_event("task-done", 300, pred=lambda ev: ev["n"] >= 1)
            for p in self.api.pods(ctx["ns"]):
                if p["spec"].get("nodeName") == doomed.node and not p["metadata"].get("deletionTimestamp"):
                    lost[p["metadata"]["labels"]["spark-exec-id"]] = p["metadata"]["uid"]
            if len(lost) != n:
                raise AssertionError(f"{len(lost)} of {n} executor pods on {doomed.node} before the loss")
            ctx["not_live"].update(lost.values())
            doomed.lose()
            t = time.monotonic()
            self.api.merge_patch(proc_node, {"metadata": {"labels": {POOL: pool}}})
            log(f"node {doomed.node} lost with executors {sorted(lost, key=int)}")
            # Until stoker has noticed, the lost pods look live and RUNNING: recovery would pass at
            # once. Wait for the driver to be told about every lost executor (any reason: the
            # check counts the reasons).
            def told():
                if drv.proc.poll() is not None:
                    raise AssertionError(f"driver exited ({drv.proc.returncode}): {drv.log()[-2000:]}")
                return set(lost) <= set(drv.exited())
            wait_until(told, 180, "the driver to hear of every executor of the lost node", interval=0.2)
            row["reported_s"] = time.monotonic() - t
            row["faults_in_job"] = drv.event("result") is None
            return t

        def count_exits(ctx):
            """The terminal events stoker sent for the application (its log has one `executor pod
            ended app=A executor=N reason=R` line per event; the plugin drops repeats, so the
            driver's log cannot show one) and the reasons the driver logged. Returns how many lost
            executors got exactly one event, NODE_LOST, logged as NODE_LOST by the driver, and the
            events sent for any other executor."""
            app = ctx["row"]["app_id"]
            sent = re.findall(rf"executor pod ended app={re.escape(app)} executor=(\d+) reason=([A-Z_0-9]+)",
                              ctx["stoker"].log())
            told = ctx["driver"].exited()
            node_lost = sum(1 for eid in lost
                            if [r for e, r in sent if e == eid] == ["NODE_LOST"] and told.get(eid) == "NODE_LOST")
            return node_lost, [f"{e} {r}" for e, r in sent if e not in lost]

        def check(ctx):
            row, watch = ctx["row"], ctx["watch"]
            row["lost_node_executors"] = len(lost)
            row["replacements"] = sum(1 for (app, eid) in watch.added() if app == row["app_id"] and eid not in lost)
            with watch.cond:
                row["lost_pods_at_node_delete"] = len(watch.live & set(lost.values()))
            self.api.delete(f"/api/v1/nodes/{doomed.node}")
            if not watch.wait_gone(time.monotonic() + 180, set(lost.values())):
                raise AssertionError("pods of the lost node still there 180 s after its Node's deletion")
            node_lost, others = count_exits(ctx)
            row["node_lost_once"], row["other_exits"] = node_lost, len(others)
            row["wrong"] += (len(lost) - node_lost) + len(others)
            if others:
                row["other_exit_ids"] = others[:20]

        def final(ctx):
            # The driver has stopped and its pods are gone: still one NODE_LOST per lost executor
            # (the replacements' ends at the application's end are not counted).
            node_lost, _ = count_exits(ctx)
            if node_lost != ctx["row"]["node_lost_once"]:
                ctx["row"]["wrong"] += ctx["row"]["node_lost_once"] - node_lost
                ctx["row"]["node_lost_once"] = node_lost

        try:
            self.api.merge_patch(f"/api/v1/nodes/{doomed.node}", {"metadata": {"labels": {POOL: pool}}})
            return self.run(case, "i", fault, check=check, n=n, job=True, fault_at=n, selector={POOL: pool},
                            final=final)
        finally:
            self.api.merge_patch(proc_node, {"metadata": {"labels": {POOL: None}}})
            doomed.stop()
            self.api.delete(f"/api/v1/nodes/{doomed.node}")

    def case_leader_failover(self):
        """(j) issue 12's failover on a real job: the same real shuffle job as (g) through two
        stoker replicas of one instance with leader election (a ReplicaPair: a Lease, both
        through the fault proxy; the driver is given both addresses, only the leader listens).
        Once the job's first map task has finished, the leader is SIGKILLed; its Lease expires
        (15 s after its last renewal), the standby takes it, starts its backend (lists and adopts
        the pods), opens its gRPC port, and the driver re-attaches to it. Nothing may be created
        twice, replaced, reported lost or deleted; the answer must be right. Recovery: from the
        leader's SIGKILL (its process reaped) to the first RPC served by the new leader, the
        driver's re-registration (the time of the new leader's `driver re-registered` log line;
        measured as the e2e test does). The notes give the SIGKILL to the Lease taken, to the
        new leader's gRPC port open, to the driver's `re-attached to stoker` log line, and to
        the application whole in the new leader's view (JOB_N RUNNING, JOB_N live pods)."""
        n = JOB_N
        pairs = []

        def make(*args):
            pairs.append(ReplicaPair(*args))
            return pairs[-1]

        def fault(ctx):
            pair, drv, row = ctx["stoker"], ctx["driver"], ctx["row"]
            old, new = pair.leader, pair.standby
            drv.wait_event("task-done", 300, pred=lambda ev: ev["n"] >= 1)
            if new.port_open() or new.first("starting stoker"):
                raise AssertionError(f"the standby {new.identity} serves gRPC or started its backend before it leads")
            drv_offset = drv.log_path.stat().st_size
            old.kill9()
            killed, t = time.time(), time.monotonic()
            pair.leader, pair.standby = new, old
            log(f"leader {old.identity} SIGKILLed")
            line, _ = wait_log(new.log_path, 0, leader_pair.SERVED, 120, new.proc, interval=0.05)
            row["served_at"] = leader_pair.stamp(line)
            row["rpc_s"] = row["served_at"] - killed
            m = re.search(r"executors=(\d+)", line)
            row["adopted_by_leader"] = int(m.group(1)) if m else 0
            row["lease_s"] = leader_pair.stamp(new.first(leader_pair.ACQUIRED)) - killed
            row["listening_s"] = leader_pair.stamp(new.first(leader_pair.LISTENING)) - killed
            text = new.log().splitlines()
            acquired = next(i for i, l in enumerate(text) if leader_pair.ACQUIRED in l)
            backend = next((i for i, l in enumerate(text) if "starting stoker" in l), None)
            if backend is None or backend < acquired:
                raise AssertionError("the new leader's backend started before it held the Lease")
            dline, _ = wait_log(drv.log_path, drv_offset, "re-attached to stoker", 60, drv.proc, interval=0.05)
            row["reattached_s"] = clock_stamp(dline, killed) - killed
            log(f"new leader {new.identity}: Lease {row['lease_s']:.1f} s, gRPC {row['listening_s']:.1f} s, first RPC "
                f"{row['rpc_s']:.1f} s, driver re-attached {row['reattached_s']:.1f} s after the SIGKILL")
            return t

        def check(ctx):
            row, pair = ctx["row"], ctx["stoker"]
            # _recover measured from the SIGKILL to the application whole in the new leader's view;
            # the row's recovery is the SIGKILL to the first RPC the new leader served.
            row["whole_s"], row["recovery_s"] = row["recovery_s"], row["rpc_s"]
            res = ctx["driver"].event("result")
            row["faults_in_job"] = res is not None and row["served_at"] < res["t"]
            holder = self.api.get(leader_pair.lease_path(pair.instance))["spec"].get("holderIdentity")
            problems = []
            if holder != pair.leader.identity:
                problems.append(f"the Lease is held by {holder}, not by the new leader {pair.leader.identity}")
            if row["adopted_by_leader"] != n:
                problems.append(f"the new leader handed back {row['adopted_by_leader']} pods, not {n}")
            if problems:
                row["error"] = "; ".join(problems)

        try:
            return self.run("real shuffle job: the leader of two replicas SIGKILLed mid-job", "j", fault,
                            check=check, n=n, job=True, fault_at=n, stoker=make)
        finally:
            for pair in pairs:
                try:
                    self.api.delete(leader_pair.lease_path(pair.instance))
                except (ApiError, OSError) as e:
                    log(f"Lease of {pair.instance}: {e!r}")


def clock_stamp(line, near):
    """A driver log line's time (log4j2's HH:mm:ss.SSS, local time; the line may follow Spark's
    console progress bar) as seconds since the epoch: on the day, of those around `near` (seconds
    since the epoch), that puts it closest to `near`."""
    h, m, sec = re.findall(r"(\d{2}):(\d{2}):(\d{2}\.\d{3}) [A-Z]+ ", line)[-1]
    day = datetime.fromtimestamp(near).replace(hour=0, minute=0, second=0, microsecond=0)
    t = (day + timedelta(hours=int(h), minutes=int(m), seconds=float(sec))).timestamp()
    return min((t + d * 86400 for d in (-1, 0, 1)), key=lambda x: abs(x - near))


def count_api_restart_effects(ctx, text):
    """What an API server restart cost stoker, from its log `text`: pod creates retried after a
    failed request, creates answered 409 (the lost attempt had reached etcd), watch errors."""
    ctx["row"]["create_retries"] = text.count("pod creation failed; retrying")
    ctx["row"]["create_409"] = text.count("pod already exists")
    ctx["row"]["watch_errors"] = text.count("pod watch error")


CASES = {"a": "case_stoker_kill", "b": "case_blackhole", "c": "case_watch_expiry", "d": "case_driver_kill",
         "e": "case_apiserver_restart", "f": "case_claim_kill", "g": "case_job", "h": "case_job_apiserver",
         "i": "case_node_lost", "j": "case_leader_failover"}
LOSS = ("duplicates", "leaked", "lost", "wrong", "wrong_answer", "live_deleted")


def summarize(rows):
    """One line per case: sums of the counts, recovery p50/max, failed runs."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = [r for r in rows if r["case"] == case]
        line = {"case": case, "runs": len(rs), "n": rs[0]["n"],
                "failed": sum(1 for r in rs if "error" in r),
                "created": sum(r.get("created", 0) for r in rs),
                "created_at_fault": [r.get("created_at_fault") for r in rs]}
        for k in LOSS + ("terminal_events",):
            vals = [r.get(k) for r in rs]
            line[k] = None if all(v is None for v in vals) else sum(v or 0 for v in vals)
        reasons = {}
        for r in rs:
            for k, v in (r.get("terminal_reasons") or {}).items():
                reasons[k] = reasons.get(k, 0) + v
        line["terminal_reasons"] = reasons
        line["setup_retries"] = sum(r.get("setup_retries", 0) for r in rs)
        line["mislabelled_at_end"] = sum(r.get("mislabelled_at_end", 0) for r in rs)
        line["watch_gaps"] = sum(r.get("watch_gaps", 0) for r in rs)
        line["errors"] = [r["error"] for r in rs if "error" in r]
        line["adopted"] = sum(r.get("adopted", 0) for r in rs) if any("adopted" in r for r in rs) else None
        rec = sorted(r["recovery_s"] for r in rs if r.get("recovery_s") is not None)
        line["recovery_p50"] = statistics.median(rec) if rec else None
        line["recovery_max"] = rec[-1] if rec else None
        if any("relisted" in r for r in rs):
            line["relisted"] = sum(1 for r in rs if r.get("relisted"))
        for k in ("apiserver_down_s", "kill_after_claim_ms", "job_s", "stoker_back_s", "reported_s", "lease_s",
                  "listening_s", "rpc_s", "reattached_s", "whole_s"):
            vals = [r[k] for r in rs if r.get(k) is not None]
            if vals:
                line[k] = (min(vals), max(vals))
        # The API server's kill to the application whole (recovery counts from its /readyz, which
        # passes only after its post-start hooks; it serves requests a little before that).
        whole = [r["apiserver_down_s"] + r["recovery_s"] for r in rs
                 if r.get("apiserver_down_s") is not None and r.get("recovery_s") is not None]
        if whole:
            line["kill_to_whole_s"] = (min(whole), max(whole))
        for k in ("claims_first", "claims_final"):
            if any(k in r for r in rs):
                line[k] = [r.get(k) for r in rs]
        for k in ("create_retries", "create_409", "watch_errors", "reaped", "lost_node_executors", "node_lost_once",
                  "other_exits", "replacements", "lost_pods_at_node_delete", "adopted_by_leader"):
            if any(k in r for r in rs):
                line[k] = sum(r.get(k, 0) for r in rs)
        if any("faults_in_job" in r for r in rs):
            line["faults_in_job"] = sum(1 for r in rs if r.get("faults_in_job"))
        out.append(line)
    return out


def table(summary):
    def f(v, fmt="{}"):
        return "n/a" if v is None else fmt.format(v)
    lines = ["| case | runs (failed) | N | executors created | duplicates | leaked pods | lost without terminal event "
             "| wrong terminal events | jobs with a wrong answer | live pods deleted | recovery p50 / max (s) | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        notes = [f"pods created at the fault: {min(x for x in s['created_at_fault'] if x is not None) if any(x is not None for x in s['created_at_fault']) else '?'}"
                 f"–{max((x for x in s['created_at_fault'] if x is not None), default='?')} of {s['n']}"]
        if "relisted" in s:
            notes.append(f"re-list seen in stoker's log: {s['relisted']}/{s['runs']}")
        if s["terminal_events"]:
            why = ", ".join(f"{v} {k}" for k, v in sorted(s["terminal_reasons"].items()))
            notes.append(f"terminal events the driver got: {why}")
        if s.get("mislabelled_at_end"):
            notes.append(f"stoker's own deletions at the application's end logged as DELETED_EXTERNALLY: "
                         f"{s['mislabelled_at_end']} (after the driver left; see README)")
        if s.get("watch_gaps"):
            notes.append(f"the harness's own watch re-listed after a 410: {s['watch_gaps']} time(s)")
        if s.get("errors"):
            notes.append("failed: " + "; ".join(e[:160] for e in s["errors"]))
        if s.get("setup_retries"):
            notes.append(f"runs repeated after a failure before the fault: {s['setup_retries']}")
        if s.get("adopted") is not None:
            notes.append(f"pods adopted by the restarted stoker: {s['adopted']}")
        if s.get("apiserver_down_s"):
            notes.append("kube-apiserver down (kill to /readyz): {:.1f}–{:.1f} s".format(*s["apiserver_down_s"]))
        if s.get("kill_to_whole_s"):
            notes.append("kube-apiserver's SIGKILL to the application whole: {:.1f}–{:.1f} s".format(*s["kill_to_whole_s"]))
        if s.get("claims_first"):
            notes.append(f"claimed by the stoker killed at its claim: {_range(s['claims_first'])}; "
                         f"by the next one: {_range(s['claims_final'])}")
        if s.get("kill_after_claim_ms"):
            notes.append("SIGKILL sent {:.0f}–{:.0f} ms after the claim's log line".format(*s["kill_after_claim_ms"]))
        if s.get("stoker_back_s"):
            notes.append("driver re-registered {:.1f}–{:.1f} s after stoker's SIGKILL".format(*s["stoker_back_s"]))
        if "create_retries" in s:
            notes.append(f"stoker's pod creates retried after a failed request: {s['create_retries']}"
                         + (f" (creates answered 409 AlreadyExists on a retry: the lost attempt had reached etcd: {s['create_409']})"
                            if "create_409" in s else "")
                         + f"; its pod watch broken and resumed: {s['watch_errors']} time(s)")
        if "reaped" in s:
            notes.append(f"pods deleted as orphans or unclaimed (stoker's log): {s['reaped']}")
        if "lost_node_executors" in s:
            notes.append(f"executors of the lost node reported NODE_LOST exactly once (stoker's log) and logged so by "
                         f"the driver: {s.get('node_lost_once', 0)}/{s['lost_node_executors']}; "
                         f"terminal events stoker sent for other executors before the driver stopped: "
                         f"{s.get('other_exits', 0)}; replacements created: {s.get('replacements', 0)}")
        if s.get("reported_s"):
            notes.append("node lost to the driver told of all its executors: {:.1f}–{:.1f} s".format(*s["reported_s"]))
        if "lost_pods_at_node_delete" in s:
            notes.append(f"pods of the lost node still on the API server when its Node was deleted after the job: "
                         f"{s['lost_pods_at_node_delete']}")
        if s.get("rpc_s"):
            notes.append(f"recovery: the leader's SIGKILL (its process reaped) to the first RPC served by the new "
                         f"leader (the time of its `driver re-registered` log line: the driver's re-registration), "
                         f"{_span(s.get('rpc_s'))}; SIGKILL to the standby holding the Lease: {_span(s.get('lease_s'))} "
                         f"(Lease duration {leader_pair.LEASE_DURATION_S} s), to its gRPC port open: "
                         f"{_span(s.get('listening_s'))}, to the driver's `re-attached to stoker` log line: "
                         f"{_span(s.get('reattached_s'))}, to the application whole in the new leader's view: "
                         f"{_span(s.get('whole_s'))}; pods handed back by the new leader: {s.get('adopted_by_leader', 0)}")
        if s.get("job_s"):
            notes.append("job time {:.0f}–{:.0f} s".format(*s["job_s"]))
        if "faults_in_job" in s:
            notes.append(f"runs whose faults all ended before the job did: {s['faults_in_job']}/{s['runs']}")
        lines.append(f"| {s['case']} | {s['runs']} ({s['failed']}) | {s['n']} | {s['created']} | {f(s['duplicates'])} | "
                     f"{f(s['leaked'])} | {f(s['lost'])} | {f(s['wrong'])} | {f(s['wrong_answer'])} | {f(s['live_deleted'])} | "
                     f"{f(s['recovery_p50'], '{:.1f}')} / {f(s['recovery_max'], '{:.1f}')} | {'; '.join(notes)} |")
    return "\n".join(lines)


def _span(pair):
    return "{:.1f}–{:.1f} s".format(*pair) if pair else "?"


def _range(vals):
    vals = [v for v in vals if v is not None]
    return f"{min(vals)}–{max(vals)}" if vals else "?"


def failed(summary):
    return [s["case"] for s in summary if s["failed"] or any(s[k] for k in LOSS)]


def run_matrix(runs, n, cases, blackhole_s, qps, work=None, watch_cache=False):
    h = Harness(work, n=n, qps=qps, blackhole_s=blackhole_s, watch_cache=watch_cache)
    rows = []
    try:
        h.start()
        for c in cases:
            for i in range(runs):
                log(f"case {c} run {i + 1}/{runs}")
                rows.append(getattr(h, CASES[c])())
    finally:
        h.stop()
    return rows, h.work


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="each case once, N=60, 20 s blackhole")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--n", type=int)
    ap.add_argument("--qps", type=int, help="stoker's --kube-qps (paces the ramp so a fault lands in it)")
    ap.add_argument("--blackhole-s", type=float)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", help="folder for chaos.md and chaos-rows.json")
    ap.add_argument("--watch-cache", action="store_true",
                    help="keep the API server's watch cache for pods (then case c cannot force a 410)")
    ap.add_argument("--render", help="print the table of a chaos-rows.json instead of running")
    a = ap.parse_args()
    if a.render:
        summary = summarize(json.loads(Path(a.render).read_text()))
        print(table(summary))
        return 1 if failed(summary) else 0
    runs = a.runs or (1 if a.quick else 10)
    n = a.n or (60 if a.quick else 500)
    qps = a.qps or (10 if a.quick else 50)
    blackhole_s = a.blackhole_s or (20 if a.quick else 30)
    cases = [c for c in a.cases.split(",") if c]
    if any(c not in CASES for c in cases):
        ap.error(f"--cases takes {','.join(CASES)}")
    t0 = time.monotonic()
    rows, work = run_matrix(runs, n, cases, blackhole_s, qps, watch_cache=a.watch_cache)
    summary = summarize(rows)
    text = (f"Fault matrix ({'quick' if a.quick else 'full'}: {runs} run(s) per case, N={n}, stoker --kube-qps {qps}"
            f"{', API server watch cache ON' if a.watch_cache else ''}), "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.monotonic() - t0:.0f} s; "
            f"lease {LEASE_TTL_S} s, delete grace {DELETE_GRACE_S} s; work dir {work}\n\n{table(summary)}\n")
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "chaos.md").write_text(text)
        (out / "chaos-rows.json").write_text(json.dumps(rows, indent=1))
    print(text)
    bad = failed(summary)
    if bad:
        print(f"FAILED: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
