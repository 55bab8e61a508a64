"""Helpers for the Kubernetes test bed (tests/testbed): the control plane (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler on 127.0.0.1) and process kubelets
(tests/kubelet, target/debug/process-kubelet) that run pods as local processes.

Only the Python standard library and kubectl: the API is spoken over HTTPS with the admin bearer
token and the cluster CA from RUNDIR/env. Every wait is bounded. Child processes get
PR_SET_PDEATHSIG, so even a SIGKILLed pytest leaves nothing running."""
import ctypes
import json
import re
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTBED_DIR = ROOT / "tests" / "testbed"
KUBELET_BIN = Path(os.environ.get("STOKER_KUBELET_BIN", ROOT / "target" / "debug" / "process-kubelet"))
FAULT = "testbed.stoker.dev/fault"
LOST = "testbed.stoker.dev/lost"

_PR_SET_PDEATHSIG = 1


def _die_with_parent(sig):
    def arm():
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    return arm


def wait_until(predicate, timeout, what, interval=0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# ---- processes -------------------------------------------------------------------------------

def _stat(pid):
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return fields  # fields[0] state, fields[2] pgrp


def alive(pid):
    """Running (a zombie is not)."""
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def group_members(pgid):
    """Live processes of process group pgid."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(entry.name)
            if st and st[0] != "Z" and st[2] == str(pgid):
                out.append(int(entry.name))
    return out


def processes_under(folder):
    """Live processes whose working directory is inside folder (container processes start in
    their pod folder), as (pid, command line)."""
    folder = str(Path(folder).resolve())
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if (cwd == folder or cwd.startswith(folder + "/")) and alive(entry.name):
            out.append((int(entry.name), cmd))
    return out


def container_pid(pod, container=None):
    """Pid (= process group) of a running container, from containerID process://<pid>."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if container in (None, cs["name"]) and cs.get("containerID", "").startswith("process://"):
            return int(cs["containerID"].split("://", 1)[1])
    return None


# ---- pods --------------------------------------------------------------------------------------

def condition(obj, kind):
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return c.get("status")
    return None


def phase(pod):
    return (pod.get("status") or {}).get("phase")


def terminated(pod, container=None):
    """The terminated state of a container, or None."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if container in (None, cs["name"]):
            t = (cs.get("state") or {}).get("terminated")
            if t:
                return t
    return None


def running(pod):
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return (
        phase(pod) == "Running"
        and bool(statuses)
        and all("running" in (cs.get("state") or {}) for cs in statuses)
    )


def pod_manifest(name, command, node, labels=None, annotations=None, env=None, volumes=None,
                 mounts=None, grace=None, restart="Never", memory_limit=None,
                 image="busybox:1.36"):
    """A one-container pod pinned to node by nodeSelector (the scheduler still binds it)."""
    container = {"name": "main", "image": image, "command": command}
    if env:
        container["env"] = env
    if mounts:
        container["volumeMounts"] = mounts
    if memory_limit:
        container["resources"] = {"limits": {"memory": memory_limit, "cpu": "1"}}
    spec = {
        "restartPolicy": restart,
        "nodeSelector": {"kubernetes.io/hostname": node},
        "containers": [container],
    }
    if volumes:
        spec["volumes"] = volumes
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}},
        "spec": spec,
    }


class ApiError(Exception):
    def __init__(self, code, body):
        super().__init__(f"HTTP {code}: {body[:500]}")
        self.code = code
        self.body = body


class Api:
    """Minimal Kubernetes REST client over HTTPS (admin bearer token, cluster CA)."""

    def __init__(self, url, token, ca):
        self.url = url.rstrip("/")
        self.token = token
        self.ctx = ssl.create_default_context(cafile=ca)

    def request(self, method, path, body=None, content_type="application/json", timeout=30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            raise ApiError(e.code, e.read().decode(errors="replace")) from None

    def get(self, path, **query):
        q = ("?" + urllib.parse.urlencode(query)) if query else ""
        return self.request("GET", path + q)

    def metric(self, name, **labels):
        """The sum of the API server's own metric `name` over the series whose labels include
        `labels` (its /metrics, Prometheus text)."""
        req = urllib.request.Request(self.url + "/metrics")
        req.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(req, context=self.ctx, timeout=30) as resp:
            text = resp.read().decode()
        want = [f'{k}="{v}"' for k, v in labels.items()]
        return sum(float(value) for series, value in
                   re.findall(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.M)
                   if all(w in series.split(",") for w in want))

    def get_opt(self, path):
        try:
            return self.get(path)
        except ApiError as e:
            if e.code == 404:
                return None
            raise

    def create(self, path, body):
        return self.request("POST", path, body)

    def delete(self, path, body=None):
        try:
            return self.request("DELETE", path, body)
        except ApiError as e:
            if e.code == 404:
                return None
            raise

    def merge_patch(self, path, body):
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    # pods and nodes
    def pod(self, name, ns="default"):
        return self.get_opt(f"/api/v1/namespaces/{ns}/pods/{name}")

    def pods(self, ns="default", **query):
        return self.get(f"/api/v1/namespaces/{ns}/pods", **query)["items"]

    def create_pod(self, manifest, ns="default"):
        return self.create(f"/api/v1/namespaces/{ns}/pods", manifest)

    def delete_pod(self, name, ns="default", grace=None, force=False):
        body = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if force:
            body["gracePeriodSeconds"] = 0
        elif grace is not None:
            body["gracePeriodSeconds"] = grace
        return self.delete(f"/api/v1/namespaces/{ns}/pods/{name}", body)

    def annotate_pod(self, name, key, value, ns="default"):
        return self.merge_patch(f"/api/v1/namespaces/{ns}/pods/{name}",
                                {"metadata": {"annotations": {key: value}}})

    def node(self, name):
        return self.get_opt(f"/api/v1/nodes/{name}")

    def wait_pod(self, name, predicate, timeout, what, ns="default"):
        last = {}

        def check():
            pod = self.pod(name, ns)
            last["pod"] = pod
            return pod if pod is not None and predicate(pod) else None
        try:
            return wait_until(check, timeout, f"pod {name}: {what}", interval=0.3)
        except AssertionError as e:
            status = json.dumps((last.get("pod") or {}).get("status"), indent=1)[:3000]
            raise AssertionError(f"{e}; last status: {status}") from None

    def wait_pod_gone(self, name, timeout, ns="default"):
        wait_until(lambda: self.pod(name, ns) is None, timeout, f"pod {name} to be removed")

    def watch(self, path, **query):
        return Watch(self, path, query)


class Watch:
    """Records every event of a watch (a daemon thread), so a test can look at states an object
    went through even after it is gone."""

    def __init__(self, api, path, query):
        self.events = []
        self.error = None
        self._cond = threading.Condition()
        q = dict(query, watch="1", timeoutSeconds="600")
        req = urllib.request.Request(f"{api.url}{path}?{urllib.parse.urlencode(q)}")
        req.add_header("Authorization", f"Bearer {api.token}")
        # Blocks until the API server has accepted the watch: nothing is missed after this.
        self._resp = urllib.request.urlopen(req, context=api.ctx, timeout=620)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        try:
            for line in self._resp:
                if line.strip():
                    ev = json.loads(line)
                    with self._cond:
                        self.events.append((ev["type"], ev["object"]))
                        self._cond.notify_all()
        except Exception as e:  # close(), or the test bed stopped
            self.error = e
        finally:
            try:
                self._resp.close()
            except Exception:
                pass

    def objects(self, name=None):
        with self._cond:
            return [(t, o) for t, o in self.events if name in (None, o["metadata"].get("name"))]

    def wait_for(self, predicate, timeout, what):
        """First (type, object) for which predicate(type, object) is true."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for t, o in self.events[seen:]:
                    if predicate(t, o):
                        return t, o
                seen = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
                self._cond.wait(min(left, 1.0))

    def close(self):
        # resp.close() would block until the reader thread's read returns (the buffered reader's
        # lock); shutting the socket down ends that read at once, and the thread then exits.
        try:
            sock = self._resp.fp.raw._sock
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except Exception:
            pass
        self._thread.join(timeout=10)


# ---- storage ---------------------------------------------------------------------------------

HOSTPATH_STORAGE_CLASS = "stoker-e2e-hostpath"


def ensure_hostpath_storage_class(api, name=HOSTPATH_STORAGE_CLASS):
    """A StorageClass whose claims the test bed's kube-controller-manager provisions at once
    (Immediate) as hostPath PVs under /tmp/hostpath_pv, deleted with their claim (Delete).
    Idempotent; one that exists with other settings is an error (those fields are immutable)."""
    want = {"provisioner": "kubernetes.io/host-path", "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate"}
    path = "/apis/storage.k8s.io/v1/storageclasses"
    try:
        api.create(path, {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                          "metadata": {"name": name}, **want})
    except ApiError as e:
        if e.code != 409:
            raise
    sc = api.get(f"{path}/{name}")
    got = {k: sc.get(k) for k in want}
    assert got == want, f"StorageClass {name} exists with other settings: {got}"
    return name


# ---- the control plane -------------------------------------------------------------------------

class Testbed:
    """The control plane, started with tests/testbed/start.sh --foreground in RUNDIR."""

    def __init__(self, rundir):
        self.rundir = Path(rundir)
        self.proc = None
        self.env = {}

    def start(self, timeout=600):
        # The first start on a machine may build the binaries (build.sh caches them).
        self.rundir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.rundir / "start.log"
        self.proc = subprocess.Popen(
            # STOKER_TESTBED_ARGS: extra `testbed up` flags, e.g. --apiserver-arg=--profiling=true
            [str(TESTBED_DIR / "start.sh"), "--foreground", str(self.rundir), "--",
             # Claims of StorageClasses with provisioner kubernetes.io/host-path get a PV at
             # /tmp/hostpath_pv/<uuid> (the process kubelet mounts hostPath PVs); a flag, not a
             # change to the test bed's Go code, so its cached build stays valid.
             "--controller-manager-arg=--enable-hostpath-provisioner=true",
             *os.environ.get("STOKER_TESTBED_ARGS", "").split()],
            stdin=subprocess.DEVNULL, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent(signal.SIGTERM),
        )

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"test bed exited {self.proc.returncode}:\n{self.log_path.read_text()[-4000:]}")
            return "TESTBED READY" in self.log_path.read_text() and (self.rundir / "env").exists()
        try:
            wait_until(ready, timeout, "the test bed to be ready", interval=0.3)
        except BaseException:
            self.stop()
            raise
        for line in (self.rundir / "env").read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep:
                self.env[key.strip()] = value.strip()
        self.api = Api(self.env["APISERVER_URL"], self.env["ADMIN_TOKEN"], self.env["CA_CERT"])
        return self

    @property
    def port(self):
        return int(self.env["APISERVER_PORT"])

    def client_env(self):
        """Environment for kubectl and Spark drivers pointed at this test bed."""
        env = dict(os.environ)
        env["KUBECONFIG"] = self.env["KUBECONFIG"]
        env["KUBECACHEDIR"] = self.env["KUBECACHEDIR"]
        return env

    def kubectl(self, *args, input=None, timeout=120, check=True):
        out = subprocess.run(["kubectl", *args], input=input, capture_output=True, text=True,
                             timeout=timeout, env=self.client_env())
        if check and out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({out.returncode}): {out.stderr[-3000:]}")
        return out

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        # Whatever is left (pid files, checked against the binary names).
        subprocess.run([str(TESTBED_DIR / "stop.sh"), str(self.rundir)], capture_output=True, timeout=60)


# ---- process kubelets ----------------------------------------------------------------------------

def pod_host_name(pod):
    """The host name of a pod run by a kubelet with --pod-hosts-file (tests/kubelet/src/hosts.rs):
    `<pod>.<namespace>.pod`, 127.0.0.1 in that file."""
    meta = pod["metadata"]
    return f"{meta['name']}.{meta.get('namespace') or 'default'}.pod".lower()


def hosts_file_java_option(path):
    """The JVM option that makes a JVM resolve names with the pod hosts file `path` alone (the
    JDK's jdk.net.hosts.file, read again on each lookup: it replaces /etc/hosts and DNS)."""
    return f"-Djdk.net.hosts.file={path}"


class Kubelet:
    """One process-kubelet run (its own nodes, work dir and log). With `pod_hosts_file` (a path,
    which kubelets may share) each pod gets a host name of its own (pod_host_name) there, which
    its Spark executor advertises while binding 127.0.0.1; the pod's IP stays 127.0.0.1."""

    def __init__(self, testbed, work_root, node_name, spark_home=None, mode="process",
                 max_pods=250, extra=(), pod_hosts_file=None, env=None):
        self.testbed = testbed
        self.node = node_name
        self.work_dir = Path(work_root) / node_name
        self.log_path = Path(work_root) / f"{node_name}.kubelet.log"
        self.spark_home = spark_home
        self.mode = mode
        self.pod_hosts_file = pod_hosts_file
        # More environment for the kubelet (e.g. JAVA_HOME: the `java` of Spark executors).
        self.env = dict(env or {})
        self.args = [
            "--node-name", node_name, "--mode", mode, "--work-dir", str(self.work_dir),
            "--max-pods", str(max_pods), "--delete-nodes-on-exit", *extra,
        ]
        if spark_home:
            self.args += ["--spark-home", str(spark_home)]
        if pod_hosts_file:
            self.args += ["--pod-hosts-file", str(pod_hosts_file)]
        self.proc = None

    def start(self, timeout=60):
        assert KUBELET_BIN.exists(), f"{KUBELET_BIN} missing: run scripts/setup.sh"
        env = {**self.testbed.client_env(), **self.env}
        env.setdefault("RUST_LOG", "info")
        self.proc = subprocess.Popen(
            [str(KUBELET_BIN), *self.args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(self.log_path, "w"),
            env=env, preexec_fn=_die_with_parent(signal.SIGKILL),
        )
        api = self.testbed.api

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"kubelet exited {self.proc.returncode}:\n{self.log()[-4000:]}")
            node = api.node(self.node)
            # Ready, and the node lifecycle controller has lifted the not-ready taint.
            return (node is not None and condition(node, "Ready") == "True"
                    and not (node.get("spec") or {}).get("taints"))
        try:
            wait_until(ready, timeout, f"node {self.node} to be Ready and untainted", interval=0.3)
        except BaseException:
            self.stop()
            raise
        return self

    def log(self):
        return self.log_path.read_text() if self.log_path.exists() else ""

    def pod_dir(self, pod, ns="default"):
        return self.work_dir / ns / f"{pod['metadata']['name']}-{pod['metadata']['uid'][:8]}"

    def kill9(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def lose(self):
        """The machine is gone (the LOST annotation on its Node): the kubelet kills the node's
        containers and stops writing anything (no Lease renewal, no status), so the node lifecycle
        controller marks the node NotReady and its pods not ready after its grace period (20 s on
        the test bed). The Node stays until it is deleted."""
        self.testbed.api.merge_patch(f"/api/v1/nodes/{self.node}", {"metadata": {"annotations": {LOST: "true"}}})

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
