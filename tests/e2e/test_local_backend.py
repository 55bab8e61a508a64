"""End-to-end: real Spark drivers get their executors from stoker's local backend."""
import re
import time

import pytest

from conftest import (
    ASKED_FOR_2,
    DECOMMISSIONING,
    QUEUES_FOUR_EXECUTORS,
    Stoker,
    check_given_back_outputs_migrated,
    executor_pids,
    executors_given_back,
    local_executor_logs,
    wait_tasks_running,
    wait_until,
)

import os
import signal
import urllib.request


def check_result(result, rows=1_000_000):
    for r in result["results"]:
        assert r["groups"] == 1000
        assert r["count"] == rows
        assert r["sum"] == rows * (rows - 1) // 2


def test_shuffle_job_returns_the_right_answer_on_two_executors(stoker, driver_factory, work_dir):
    driver = driver_factory(stoker, "--executors", "2")
    result = driver.wait(timeout=300)
    check_result(result)
    assert result["results"][0]["executors_alive"] >= 2
    log = driver.log()
    assert "re-attached" not in log
    # stoker launched executors 1 and 2 as processes with their own logs.
    app_logs = list(work_dir.glob("*/executor-*.log"))
    assert len(app_logs) >= 2, app_logs


@pytest.mark.long
def test_killed_executor_is_reported_replaced_and_the_job_finishes(stoker, driver_factory, work_dir):
    driver = driver_factory(stoker, "--executors", "2", "--slow-ms", "1500", "--partitions", "24")
    driver.wait_event("job-start", timeout=180)
    pids = wait_until(lambda: executor_pids(work_dir) if len(executor_pids(work_dir)) >= 2 else None,
                      120, "two executors")
    wait_tasks_running(local_executor_logs(work_dir), 2)
    victim = pids[0]
    os.kill(victim, signal.SIGKILL)
    result = driver.wait(timeout=400)
    check_result(result)
    log = driver.log()
    # The driver was told, with the exit code (SIGKILL: 128 + 9).
    assert re.search(r"stoker: executor \d+ exited with code 137 \(SIGNALED\)", log), log[-5000:]
    # A replacement was started: a third executor log exists.
    assert len(list(work_dir.glob("*/executor-*.log"))) >= 3


@pytest.mark.long
def test_dynamic_allocation_scales_up_and_down(stoker, driver_factory, work_dir):
    driver = driver_factory(
        stoker, "--dynamic", "--executors", "3", "--slow-ms", "800", "--partitions", "30",
        "--jobs", "2", "--pause-s", "15",
    )
    driver.wait_event("job-start", timeout=180)
    wait_until(lambda: len(executor_pids(work_dir)) >= 2, 120, "scale-up to at least 2 executors")
    driver.wait_event("idle", timeout=300)
    # Idle: executors are released after the idle timeout.
    wait_until(lambda: len(executor_pids(work_dir)) == 0, 60, "scale-down to 0 when idle")
    result = driver.wait(timeout=400)
    check_result(result)


@pytest.mark.long
def test_driver_sigkill_removes_every_executor_within_the_lease(stoker, driver_factory, work_dir):
    driver = driver_factory(stoker, "--executors", "2", "--jobs", "2", "--pause-s", "120")
    started = driver.wait_event("started", timeout=120)
    driver.wait_event("idle", timeout=300)
    assert len(executor_pids(work_dir)) == 2
    app_id = started["app_id"]
    assert app_id in stoker.apps()
    driver.kill9()
    killed_at = time.monotonic()
    # Lease 6s: stoker forgets the application and every executor process is gone.
    wait_until(lambda: app_id not in stoker.apps(), 6 + 15, "lease expiry")
    wait_until(lambda: not executor_pids(work_dir), 6 + 15, "executors to be removed")
    assert time.monotonic() - killed_at < 6 + 15


@pytest.mark.long
def test_driver_reattaches_after_stoker_restart(work_dir, driver_factory):
    server = Stoker(work_dir).start()
    try:
        driver = driver_factory(server, "--executors", "2", "--jobs", "2", "--pause-s", "20")
        driver.wait_event("idle", timeout=300)
        server.kill9()
        # Executors die with stoker (parent-death signal): nothing is orphaned.
        wait_until(lambda: not executor_pids(work_dir), 30, "executors to die with stoker")
        server.start()
        result = driver.wait(timeout=400)
        check_result(result)
        # The restarted stoker saw the driver register again and started new executors for it.
        log = server.log_path.read_text()
        assert log.count("application registered") >= 2, log[-3000:]
    finally:
        server.stop()


@pytest.mark.long
def test_out_of_memory_executor_is_replaced_by_a_bigger_one_and_the_job_finishes(
    stoker, driver_factory, work_dir
):
    # Each task holds a 600 MiB string in the JVM heap; spark.executor.memory is 512m.
    driver = driver_factory(stoker, "--mib", "600", "--tasks", "2", job="heap_hog.py")
    result = driver.wait(timeout=400)
    assert result["lengths"] == [600 * 1024 * 1024] * 2
    # The driver sees the live executor's real storage memory: (heap - 300 MiB) x 0.6, 127 MiB
    # for the 512m executor, more for the grown one.
    assert result["storage_mib"] and all(m > 200 for m in result["storage_mib"]), result
    log = driver.log()
    resizes = re.findall(
        r"stoker: profile 0 now starts executors with (\d+) MiB heap \+ (\d+) MiB overhead "
        r"after executor (\d+) ran out of heap \(OutOfMemoryError, exit code 52\)",
        log,
    )
    assert 1 <= len(resizes) <= 2, log[-8000:]
    # The driver heard of each out-of-memory exit, and each replacement ran with the bigger
    # heap: the local backend's -Xmx.
    assert re.search(r"stoker: executor \d+ exited with code 52", log), log[-8000:]
    heaps = [int(h) for h, _, _ in resizes]
    assert heaps == sorted(heaps) and heaps[0] > 512, heaps
    stoker_log = (work_dir / "stoker.log").read_text()
    assert f"heap_mib={heaps[-1]}" in stoker_log, stoker_log[-3000:]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{stoker.metrics_port}/metrics").read().decode()
    assert f'stoker_executor_resizes_total{{cause="heap"}} {len(resizes)}' in metrics, metrics


def test_the_next_run_of_a_sizing_key_starts_at_the_size_that_worked_and_a_far_smaller_run_steps_it_down(
    stoker, driver_factory, work_dir
):
    # Executors poll their memory every 100 ms, so the driver holds each one's peak (with Spark's
    # default, 0, it holds a heartbeat snapshot and the plugin reports nothing).
    key = ("--conf", "spark.stoker.sizing.key=heap-hog",
           "--conf", "spark.executor.metrics.pollingInterval=100ms")
    big = ("--mib", "600", "--tasks", "2", *key)
    first = driver_factory(stoker, *big, job="heap_hog.py")
    first.wait(timeout=400)
    grown = re.findall(r"now starts executors with (\d+) MiB heap \+ (\d+) MiB overhead", first.log())
    assert grown, first.log()[-8000:]
    heap, overhead = map(int, grown[-1])
    assert (work_dir / "sizes.tsv").exists()
    # It grew during the run: the size it ended with was needed, whatever it used.
    assert "steps down" not in first.log(), first.log()[-8000:]

    # The same data again: it starts at the grown size, never runs out of heap, and used too much
    # of it to step down.
    second = driver_factory(stoker, *big, job="heap_hog.py")
    result = second.wait(timeout=400)
    assert result["lengths"] == [600 * 1024 * 1024] * 2
    log = second.log()
    assert f"profile 0 starts executors with {heap} MiB heap" in log, log[-8000:]
    assert "exit code 52" not in log and "exited with code 52" not in log, log[-8000:]
    assert "now starts executors" not in log, log[-8000:]
    assert "steps down" not in log, log[-8000:]

    # A run with little data (10 MiB per task) at the grown size: its executors used under half
    # of one notch smaller, so stoker steps the remembered size down, tells the driver, and the
    # next run of the key starts there.
    third = driver_factory(stoker, "--mib", "10", "--tasks", "2", *key, job="heap_hog.py")
    third.wait(timeout=400)
    log = third.log()
    assert f"profile 0 starts executors with {heap} MiB heap" in log, log[-8000:]
    stepped = re.search(
        rf"stoker: profile 0's size steps down from {heap} MiB heap \+ {overhead} MiB overhead to "
        r"(\d+) MiB heap \+ (\d+) MiB overhead for the next run of spark.stoker.sizing.key "
        r'"heap-hog": its executors used at most (\d+) MiB of heap',
        log,
    )
    assert stepped, log[-8000:]
    lower, used = int(stepped.group(1)), int(stepped.group(3))
    assert 512 <= lower < heap and 0 < used * 2 <= lower, stepped.group(0)
    sizes = (work_dir / "sizes.tsv").read_text()
    assert f"heap-hog\t0\t512\t384\t{lower}\t{stepped.group(2)}\t" in sizes, sizes


def test_stage_level_scheduling_with_a_new_profile_is_refused_by_spark_by_name(stoker, driver_factory):
    """Spark itself refuses a non-default resource profile for any master but yarn, k8s:// and
    standalone (ResourceProfileManager.isSupported), before stoker is asked: the job using one
    fails with Spark's message, and the application goes on (a plain job's answer is right)."""
    driver = driver_factory(stoker, job="stage_level.py")
    result = driver.wait(timeout=300)
    assert result["plain_sum"] == sum(range(1000)), result
    error = result["profile_error"] or ""
    assert "ResourceProfiles are only supported on YARN and Kubernetes and Standalone" in error, result


@pytest.mark.long
def test_fair_share_admits_a_later_application_and_tells_the_first(work_dir, driver_factory):
    queue_file = work_dir / "queues.toml"
    queue_file.write_text(QUEUES_FOUR_EXECUTORS)
    server = Stoker(work_dir, extra_args=["--queues", str(queue_file)]).start()
    try:
        # A: dynamic allocation, asks for up to 8 with a backlog long enough to keep asking.
        a = driver_factory(
            server, "--dynamic", "--executors", "8", "--slow-ms", "1500", "--partitions", "48",
        )
        started_a = a.wait_event("started", timeout=180)
        admitted_all = re.compile(r"stoker: admitted 4 of [5-8] executors \(queue default, fair share 4\)")
        wait_until(lambda: admitted_all.search(a.log()), 180, "A admitted 4 of the executors it asks for")

        # B arrives later with two executors: it gets them (its floor at least), and A is told
        # that its share is now 2.
        b = driver_factory(server, "--executors", "2", "--slow-ms", "200", "--partitions", "8")
        started_b = b.wait_event("started", timeout=180)
        halved = re.compile(r"stoker: admitted 2 of [5-8] executors \(queue default, fair share 2\)")
        wait_until(lambda: halved.search(a.log()), 120, "A told of its fair share of 2")

        apps = server.apps()
        assert started_a["app_id"] in apps and started_b["app_id"] in apps, apps
        queues = server.cli("queues")
        assert queues.returncode == 0, queues.stderr
        rows = {line.split()[0]: line.split() for line in queues.stdout.splitlines()[1:] if line.strip()}
        # QUEUE WEIGHT GUARANTEED MAX ADMITTED RUNNING PENDING REQUESTED APPLICATIONS
        assert rows["default"][4] == "4" and rows["default"][-1] == "2", queues.stdout
        assert "capacity: 4 executors" in queues.stdout

        result_b = b.wait(timeout=400)
        check_result(result_b)
        assert result_b["results"][0]["executors_alive"] >= 1
        result_a = a.wait(timeout=600)
        check_result(result_a)

        # Each admission was told once: no line repeats the one before it.
        told = re.findall(r"stoker: (admitted [^\n]*)", a.log())
        assert all(x != y for x, y in zip(told, told[1:])), told
        log = server.log_path.read_text()
        assert "fair share: queue file loaded" in log, log[-3000:]
    finally:
        server.stop()
        wait_until(lambda: not executor_pids(work_dir), 30, "executor processes to end")


def test_fair_share_reclaim_decommissions_the_first_applications_executors_and_migrates_their_blocks(
        work_dir, driver_factory):
    queue_file = work_dir / "queues.toml"
    queue_file.write_text(QUEUES_FOUR_EXECUTORS)
    server = Stoker(work_dir, extra_args=["--queues", str(queue_file)]).start()
    try:
        # A: dynamic allocation with a backlog long enough to keep its 4 executors busy.
        a = driver_factory(
            server, "--dynamic", "--executors", "8", "--slow-ms", "1500", "--partitions", "160",
            *DECOMMISSIONING,
        )
        app_a = a.wait_event("started", timeout=180)["app_id"]
        a.wait_event("job-start", timeout=120)

        def registered_with_a():
            logs = (work_dir / app_a).glob("executor-*.log")
            return [p for p in logs if "Successfully registered with driver" in p.read_text()]
        # All 4 registered with A's driver (and busy): the reclaim has to decommission two of them.
        # (Executors that have not registered yet would go first, stopped before they hold
        # anything: the plugin's unit tests show that choice.)
        wait_until(lambda: len(registered_with_a()) >= 4, 180, "A's 4 executors registered")

        # B arrives: A is asked once to give 2 back, and decommissions 2 of its executors.
        b = driver_factory(server, "--executors", "2", "--slow-ms", "200", "--partitions", "8")
        b.wait_event("started", timeout=180)
        wait_until(lambda: ASKED_FOR_2.search(a.log()), 120, "A asked to give back 2 executors")
        given = wait_until(lambda: executors_given_back(a.log()), 60, "A gives back 2 executors of its choice")
        assert len(given) == 2 and all(how == "decommissioning" for _, how in given), given
        given = [executor for executor, _ in given]
        # Spark decommissioned them (their own logs say so) and they left: A has 2 exits.
        for executor in given:
            executor_log = work_dir / app_a / f"executor-{executor}.log"
            wait_until(lambda: f"Decommission executor {executor}." in executor_log.read_text(), 60,
                       f"executor {executor} decommissioning")
        wait_until(lambda: int(server.apps()[app_a][7]) >= 2, 120, "A's 2 executors gone")

        result_b = b.wait(timeout=400)
        check_result(result_b)
        assert result_b["results"][0]["executors_alive"] >= 1
        result_a = a.wait(timeout=600)
        check_result(result_a)

        log_a = a.log()
        # Told once (however many allocations ran), given back in time: nothing removed by force.
        assert len(ASKED_FOR_2.findall(log_a)) == 1, ASKED_FOR_2.findall(log_a)
        assert "RECLAIMED" not in log_a and "not given back" not in log_a
        server_log = server.log_path.read_text()
        assert "fair share: asked the driver to give back 2 executors" in server_log, server_log[-3000:]
        # Each of A's executors had a loopback address of its own (stoker's default
        # `--executor-host loopback`), so Spark took each for a host of its own, as pods are.
        plain = re.sub(r"\x1b\[[0-9;]*m", "", server_log)
        hosts = dict(re.findall(rf"executor process started app={re.escape(app_a)} executor=(\d+) .*?host=(\S+)", plain))
        assert len(hosts) >= 4 and len(set(hosts.values())) == len(hosts), hosts
        assert all(h.startswith("127.") and h != "127.0.0.1" for h in hosts.values()), hosts
        # Running tasks finished on the given-back executors and their map outputs moved to
        # another host: no task ran again (with one host for all, Spark's same-host rule re-ran
        # the map tasks that had finished on them).
        logs = [(work_dir / app_a / f"executor-{e}.log").read_text() for e in given]
        finished, migrated, reruns = check_given_back_outputs_migrated(logs, result_a)
        print(f"reclaim: A gave back executors {given}; map outputs on them {finished}, migrated "
              f"{migrated}; task re-runs A={reruns} B={result_b['results'][0]['task_reruns']}")
    finally:
        server.stop()
        wait_until(lambda: not executor_pids(work_dir), 30, "executor processes to end")


@pytest.mark.long
def test_fair_share_removes_the_newest_executors_a_driver_does_not_give_back_by_the_deadline(
        work_dir, driver_factory):
    """A driver that cannot give executors back (spark.decommission.enabled off, every executor
    busy with a 40 s task: Spark refuses to kill a busy one) keeps them past the reclaim
    deadline; stoker then removes the newest ones itself and tells the driver why. Their tasks
    run again elsewhere (no more than those), and both answers are right."""
    queue_file = work_dir / "queues.toml"
    queue_file.write_text(QUEUES_FOUR_EXECUTORS)
    server = Stoker(work_dir, extra_args=["--queues", str(queue_file), "--reclaim-timeout", "10s"]).start()
    try:
        # A: 8 map tasks of 40 s each, one per executor at a time: its 4 executors stay busy for
        # the whole reclaim window. No decommissioning.
        a = driver_factory(server, "--dynamic", "--executors", "8", "--slow-ms", "40000", "--partitions", "8")
        app_a = a.wait_event("started", timeout=180)["app_id"]
        executor_logs = lambda: list((work_dir / app_a).glob("executor-*.log"))  # noqa: E731
        wait_tasks_running(executor_logs, 4, timeout=180)

        b = driver_factory(server, "--executors", "2", "--slow-ms", "200", "--partitions", "8")
        b.wait_event("started", timeout=180)
        wait_until(lambda: ASKED_FOR_2.search(a.log()), 120, "A asked to give back 2 executors")
        # The plugin cannot decommission and Spark does not kill busy executors: it says so.
        wait_until(lambda: "spark.decommission.enabled is false, so executors cannot be decommissioned"
                   in a.log(), 30, "A saying it cannot decommission")
        removed = re.compile(r"stoker: removing executors (\d+), (\d+) of resource profile 0: not given back "
                             r"by the reclaim deadline \(over its fair share in queue default\)")
        match = wait_until(lambda: removed.search(a.log()), 60, "stoker removing 2 of A's executors at the deadline")
        ids = sorted(match.groups(), key=int)
        # The newest two: stoker's executor ids grow, A had 1 to 4.
        assert ids == ["3", "4"], ids
        server_log = server.log_path.read_text()
        assert "fair share: asked the driver to give back 2 executors" in server_log, server_log[-3000:]
        # Their processes ended, reported to the driver; B gets its 2.
        wait_until(lambda: int(server.apps()[app_a][7]) >= 2, 60, "A's 2 executors gone")
        # Spark's scheduler took each as lost (TaskSchedulerImpl: "Lost executor N on HOST: …").
        for executor in ids:
            wait_until(lambda: re.search(rf"Lost executor {executor} on 127\.", a.log()), 30,
                       f"A's driver losing executor {executor}")

        result_b = b.wait(timeout=400)
        check_result(result_b)
        assert result_b["results"][0]["executors_alive"] >= 1
        result_a = a.wait(timeout=600)
        check_result(result_a)
        # Only the tasks that ran on the removed executors ran again (at most one each).
        reruns = result_a["results"][0]["task_reruns"]
        assert reruns <= 2, reruns
        print(f"reclaim deadline: stoker removed A's executors {ids}; task re-runs A={reruns}")
    finally:
        server.stop()
        wait_until(lambda: not executor_pids(work_dir), 30, "executor processes to end")
