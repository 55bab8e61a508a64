"""Fixtures for end-to-end tests: a real stoker server on the local backend, and real PySpark
drivers (pyspark from PyPI, with the stoker plugin jar) talking to it over loopback."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STOKER = Path(os.environ.get("STOKER_BIN", ROOT / "target" / "debug" / "stoker"))
JAR = Path(os.environ.get("STOKER_PLUGIN_JAR", ROOT / "spark-plugin" / "target" / "stoker-spark-plugin.jar"))
JOBS = Path(__file__).resolve().parent / "jobs"


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "long: a second, slower case of a kind that `make test` already runs (on the other backend or "
        "in a quicker form); `make test-long` runs these, `make test` does not")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A fair-share queue file: one queue, every identity allowed, 4 executors in all.
QUEUES_FOUR_EXECUTORS = """
default_queue = "default"

[capacity]
executors = 4

[[queues]]
name = "default"
allow = ["*"]
"""

# Spark settings that let an executor be decommissioned with its blocks migrated.
DECOMMISSIONING = [
    "--conf", "spark.decommission.enabled=true",
    "--conf", "spark.storage.decommission.enabled=true",
    "--conf", "spark.storage.decommission.shuffleBlocks.enabled=true",
    "--conf", "spark.storage.decommission.rddBlocks.enabled=true",
]


# What a driver over its fair share logs when stoker asks it for 2 executors back.
ASKED_FOR_2 = re.compile(
    r"stoker: give back 2 executors by \d\d:\d\d:\d\d \(over its fair share in queue default\)")
_CHOSE = re.compile(r"stoker: giving back executor\(s\) (.*) by (decommissioning|stopping) them")


def executors_given_back(driver_log, count=2):
    """The executors a driver chose to give back, as [(id, "decommissioning" | "stopping")], once
    there are `count` of them (one log line per choice), else None."""
    given = [(i, how) for line, how in _CHOSE.findall(driver_log) for i in re.findall(r"(\d+) \(", line)]
    return given if len(given) >= count else None


def check_given_back_outputs_migrated(executor_logs, result):
    """Running tasks finished on the decommissioned executors and every map output they wrote
    moved to an executor that stays before they left, and no task ran again. Spark treats a
    decommissioned executor's host as going away with it, so a map task that finished there
    while its stage still runs is run again unless its output moved to another *host*
    (TaskSetManager.executorLost): every executor needs a host of its own, as pods have (the
    local backend's loopback address per executor; the test bed's pod hosts file). Returns (map
    outputs written there, migrated, task re-runs)."""
    finished = sum(len(re.findall(r"Finished task \d+\.\d+ in stage 0\.0", log)) for log in executor_logs)
    migrated = sum(len(re.findall(r"Migrated migrate_shuffle_0_\d+ ", log)) for log in executor_logs)
    assert finished >= 2 and migrated >= finished, (finished, migrated)
    reruns = result["results"][0]["task_reruns"]
    assert reruns == 0, (reruns, finished)
    return finished, migrated, reruns


RUNNING_TASK = "Executor: Running task"


def wait_tasks_running(logs, n, timeout=120):
    """Waits until at least `n` of the executor logs `logs()` returns (paths) show a task
    running (Spark's executor logs `Executor: Running task ...` as it starts each task)."""
    def busy():
        running = [p for p in logs() if p.exists() and RUNNING_TASK in p.read_text(errors="replace")]
        return running if len(running) >= n else None
    return wait_until(busy, timeout, f"tasks running on {n} executors")


def local_executor_logs(work_dir):
    """The local backend's executor logs under a stoker work dir (<app>/executor-<id>.log)."""
    return lambda: list(Path(work_dir).glob("*/executor-*.log"))


def executor_pids(work_dir):
    """Executor JVMs started by this stoker, found by their work directory in /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in args]
        if "org.apache.spark.executor.CoarseGrainedExecutorBackend" in text and any(
            str(work_dir) in a for a in text
        ):
            pids.append(int(entry.name))
    return sorted(pids)


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Stoker:
    def __init__(self, work_dir, lease_ttl="6s", extra_args=()):
        self.work_dir = work_dir
        # More `stoker serve` flags (e.g. --queues FILE).
        self.extra_args = list(extra_args)
        self.port = free_port()
        self.metrics_port = free_port()
        self.lease_ttl = lease_ttl
        self.proc = None
        self.log_path = work_dir / "stoker.log"
        # The CA that signed stoker's certificate when it serves TLS (see KubeStoker); None:
        # plaintext.
        self.tls_ca = None

    def start(self):
        assert STOKER.exists(), f"{STOKER} missing: run scripts/setup.sh"
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [
                str(STOKER), "serve",
                "--listen", f"127.0.0.1:{self.port}",
                "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
                "--work-dir", str(self.work_dir),
                "--lease-ttl", self.lease_ttl,
                "--delete-grace", "3s",
                *self.extra_args,
            ],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_until(self._listening, 30, "stoker to listen")
        return self

    def _listening(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"stoker exited: {self.log_path.read_text()[-3000:]}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def server_args(self):
        """How `stoker apps`/`executors` reach this server."""
        if self.tls_ca:
            return ["--server", f"https://{self.address}", "--tls-ca", str(self.tls_ca)]
        return ["--server", f"http://{self.address}"]

    def driver_confs(self):
        """What a driver needs to reach this server (its CA when it serves TLS)."""
        if self.tls_ca:
            return ["--conf", "spark.stoker.tls.enabled=true", "--conf", f"spark.stoker.tls.caFile={self.tls_ca}"]
        return []

    def cli(self, *args):
        out = subprocess.run(
            [str(STOKER), *args, *self.server_args(), "--work-dir", str(self.work_dir)],
            capture_output=True, text=True, timeout=30,
        )
        return out

    def apps(self):
        out = self.cli("apps")
        assert out.returncode == 0, out.stderr
        rows = [line.split() for line in out.stdout.strip().splitlines()[1:]]
        return {r[0]: r for r in rows}

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Driver:
    """A PySpark driver process running a job of tests/e2e/jobs (shuffle.py unless told)."""

    def __init__(self, stoker, work_dir, *args, job="shuffle.py"):
        assert JAR.exists(), f"{JAR} missing: run scripts/setup.sh"
        env = dict(os.environ)
        env["STOKER_PLUGIN_JAR"] = str(JAR)
        env["PYSPARK_PYTHON"] = sys.executable
        env["PYSPARK_DRIVER_PYTHON"] = sys.executable
        env.pop("SPARK_HOME", None)
        self.log_path = work_dir / f"driver-{time.monotonic_ns()}.log"
        self.out_path = work_dir / f"driver-{time.monotonic_ns()}.out"
        self.proc = subprocess.Popen(
            # `stoker` may be a bare address holder (several replicas' addresses): no TLS then.
            [sys.executable, str(JOBS / job), stoker.address, *getattr(stoker, "driver_confs", list)(), *args],
            stdout=open(self.out_path, "w"), stderr=open(self.log_path, "w"), env=env,
            start_new_session=True,
        )

    def events(self):
        lines = self.out_path.read_text().splitlines()
        return [json.loads(l) for l in lines if l.startswith("{")]

    def event(self, name):
        return next((e for e in self.events() if e.get("event") == name), None)

    def wait_event(self, name, timeout):
        def check():
            if self.proc.poll() is not None and not self.event(name):
                raise AssertionError(
                    f"driver exited {self.proc.returncode} before {name}:\n{self.log()[-6000:]}"
                )
            return self.event(name)
        return wait_until(check, timeout, f"driver event {name}")

    def log(self):
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait(self, timeout):
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise AssertionError(f"driver did not finish in {timeout}s:\n{self.log()[-6000:]}")
        assert code == 0, f"driver failed ({code}):\n{self.log()[-8000:]}"
        return self.event("result")

    def kill9(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


@pytest.fixture
def work_dir(tmp_path):
    return tmp_path


@pytest.fixture
def stoker(work_dir):
    server = Stoker(work_dir).start()
    yield server
    server.stop()
    # Nothing may outlive stoker.
    wait_until(lambda: not executor_pids(work_dir), 30, "executor processes to end")


@pytest.fixture
def driver_factory(work_dir):
    drivers = []

    def make(stoker, *args, job="shuffle.py"):
        d = Driver(stoker, work_dir, *args, job=job)
        drivers.append(d)
        return d

    yield make
    for d in drivers:
        if d.proc.poll() is None:
            d.kill9()


# ---- Kubernetes test bed (tests/testbed) and process kubelets (tests/kubelet) ----------------

from testbed import (  # noqa: E402
    Kubelet,
    Testbed,
    ensure_hostpath_storage_class,
    hosts_file_java_option,
    processes_under,
)

PROCESS_NODE = "testbed-node"


def driver_hosts_file_args(path):
    """A driver's settings for executors on kubelets with the pod hosts file `path`
    (kubelet_factory(..., pod_hosts_file=path)): its JVM resolves their host names with that file
    too (spark.driver.defaultJavaOptions, so that a test's spark.driver.extraJavaOptions adds to
    it; the driver still binds and advertises 127.0.0.1)."""
    return ["--conf", f"spark.driver.defaultJavaOptions={hosts_file_java_option(path)}"]


def spark_home():
    """The Spark installation of the pyspark package (stands in for the image's /opt/spark)."""
    import pyspark

    return Path(pyspark.__file__).resolve().parent


@pytest.fixture(scope="session")
def testbed(tmp_path_factory):
    """One control plane for the session (about 10 s to start), stopped at the end."""
    plane = Testbed(tmp_path_factory.mktemp("testbed")).start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def hostpath_storage_class(testbed):
    """Name of the StorageClass stoker-e2e-hostpath: claims get a hostPath PV under
    /tmp/hostpath_pv at once, removed with the claim; the process kubelet mounts them."""
    return ensure_hostpath_storage_class(testbed.api)


@pytest.fixture(scope="session")
def kubelet_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("kubelets")
    yield root
    # No container process of any kubelet may outlive the session.
    left = wait_until_quiet(root)
    assert not left, f"container processes left behind: {left}"


def wait_until_quiet(root, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        left = processes_under(root)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.3)


@pytest.fixture(scope="session")
def process_kubelet(testbed, kubelet_root):
    """The session's process kubelet: node testbed-node, containers as local processes."""
    k = Kubelet(testbed, kubelet_root, PROCESS_NODE, spark_home=spark_home()).start()
    try:
        yield k
    finally:
        k.stop()


@pytest.fixture
def process_node_cordoned(testbed, process_kubelet):
    """The session's node takes no new pod during the test (whose executors run on kubelets of
    its own, e.g. with a pod hosts file: the session's kubelet gives every executor host
    127.0.0.1)."""
    testbed.kubectl("cordon", PROCESS_NODE)
    try:
        yield
    finally:
        testbed.kubectl("uncordon", PROCESS_NODE)


@pytest.fixture
def kubelet_factory(testbed, kubelet_root):
    """Further kubelets on their own nodes for one test; stopped (their nodes and pods removed)
    when the test ends."""
    started = []

    def make(node_name, **kwargs):
        kwargs.setdefault("spark_home", spark_home())
        k = Kubelet(testbed, kubelet_root, node_name, **kwargs)
        started.append(k)
        return k.start()

    yield make
    api = testbed.api
    for k in started:
        k.stop()
        # A SIGKILLed or lost kubelet leaves its Node and pods behind.
        api.delete(f"/api/v1/nodes/{k.node}")
        for pod in api.get("/api/v1/pods", fieldSelector=f"spec.nodeName={k.node}")["items"]:
            api.delete_pod(pod["metadata"]["name"], pod["metadata"]["namespace"], force=True)
    for k in started:
        left = wait_until_quiet(k.work_dir)
        assert not left, f"container processes of {k.node} left behind: {left}"
