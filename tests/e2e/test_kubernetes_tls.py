"""End-to-end on the test bed with authentication and TLS on: a driver with its ServiceAccount
token and a client certificate runs a job on executor pods while stoker's certificate is rotated
on disk and stoker is then killed and restarted; the driver re-attaches over a new TLS
connection (verifying the rotated certificate) and the job finishes with no pod created twice."""
import os

from conftest import wait_until
from test_kubernetes import (  # noqa: F401  (_driver_tokens: the autouse token fixture)
    KubeStoker,
    _driver_tokens,
    _instances,
    check_result,
    k8s_args,
    pods_of,
    running_pods,
    selector,
)
from test_tls import CLIENT_EXT, SERVER_EXT, install, issue, make_ca


def test_a_job_with_auth_and_tls_survives_a_certificate_rotation_and_a_stoker_restart(
    testbed, process_kubelet, work_dir, driver_factory, monkeypatch
):
    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    certs = work_dir / "certs"
    certs.mkdir()
    make_ca(certs, "server-ca")
    client_ca = make_ca(certs, "client-ca")
    first_cert, first_key = issue(certs, "server-ca", "server-1", SERVER_EXT)
    second_cert, second_key = issue(certs, "server-ca", "server-2", SERVER_EXT)
    driver_cert, driver_key = issue(certs, "client-ca", "driver", CLIENT_EXT)
    tls_crt, tls_key = certs / "tls.crt", certs / "tls.key"
    install(first_cert, tls_crt)
    install(first_key, tls_key)

    instance = f"e2e-tls-{os.getpid()}-{next(_instances)}"
    kube = KubeStoker(work_dir, testbed, instance, extra=[
        "--tls-cert", str(tls_crt), "--tls-key", str(tls_key),
        "--tls-client-ca", str(client_ca), "--tls-reload-interval", "500ms",
    ]).start()
    try:
        watch = testbed.api.watch("/api/v1/pods", labelSelector=selector(instance))
        driver = driver_factory(
            kube, "--executors", "2", "--slow-ms", "1500", "--partitions", "24", *k8s_args(),
            "--conf", "spark.stoker.tls.enabled=true",
            "--conf", f"spark.stoker.tls.caFile={certs / 'server-ca.pem'}",
            "--conf", f"spark.stoker.tls.certFile={driver_cert}",
            "--conf", f"spark.stoker.tls.keyFile={driver_key}",
        )
        driver.wait_event("job-start", timeout=180)
        app_id = driver.event("started")["app_id"]
        wait_until(lambda: len(running_pods(testbed, instance, app_id)) == 2, 120,
                   "two running pods")

        install(second_key, tls_key)
        install(second_cert, tls_crt)
        wait_until(lambda: "TLS certificate reloaded" in kube.log_path.read_text(), 30,
                   "stoker to reload its certificate")
        # A new stoker with the rotated files: the driver's next connection must verify them.
        kube.kill9()
        kube.restart_on_same_port()
        wait_until(lambda: "driver re-registered" in kube.log_path.read_text(), 60,
                   "the driver to re-register over TLS")

        result = driver.wait(timeout=400)
        check_result(result)
        created = sorted({o["metadata"]["name"] for t, o in watch.objects() if t == "ADDED"})
        watch.close()
        assert len(created) == 2, created
        wait_until(lambda: not pods_of(testbed, instance), 60, "pods deleted after the job")
    finally:
        kube.stop()
        for p in pods_of(testbed, instance):
            testbed.api.delete_pod(p["metadata"]["name"], p["metadata"]["namespace"], force=True)
