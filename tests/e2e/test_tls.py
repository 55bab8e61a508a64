"""End-to-end over TLS: a real PySpark job through a stoker that serves gRPC with a certificate
and asks for client certificates, on the local backend; the server certificate is rotated on
disk while the job runs. Certificates are made here with the openssl command."""
import subprocess

import pytest

from conftest import STOKER, Stoker, wait_until


def openssl(*args, cwd):
    out = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def make_ca(d, name):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1",
            "-subj", f"/CN={name}", cwd=d)
    return d / f"{name}.pem"


def issue(d, ca, name, ext):
    """A certificate signed by `ca`, its key in PKCS#8 PEM."""
    (d / f"{name}.ext").write_text(ext)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext",
            cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


SERVER_EXT = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
CLIENT_EXT = "extendedKeyUsage=clientAuth\n"


def install(src, dst):
    """Replaces `dst` as a secret volume does: written aside, renamed over."""
    aside = dst.with_name(f".{dst.name}.new")
    aside.write_bytes(src.read_bytes())
    aside.replace(dst)


@pytest.mark.long
def test_a_job_runs_over_tls_with_client_certificates_through_a_certificate_rotation(
    work_dir, driver_factory, monkeypatch
):
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

    # The flags' environment variables: stoker inherits them.
    monkeypatch.setenv("STOKER_TLS_CERT", str(tls_crt))
    monkeypatch.setenv("STOKER_TLS_KEY", str(tls_key))
    monkeypatch.setenv("STOKER_TLS_CLIENT_CA", str(client_ca))
    monkeypatch.setenv("STOKER_TLS_RELOAD_INTERVAL", "500ms")
    server = Stoker(work_dir).start()
    try:
        tls_conf = [
            "--conf", "spark.stoker.tls.enabled=true",
            "--conf", f"spark.stoker.tls.caFile={certs / 'server-ca.pem'}",
            "--conf", f"spark.stoker.tls.certFile={driver_cert}",
            "--conf", f"spark.stoker.tls.keyFile={driver_key}",
        ]
        # Two jobs with a pause between them: the rotation happens while the application runs.
        driver = driver_factory(server, "--executors", "2", "--jobs", "2", "--pause-s", "8",
                                *tls_conf)
        driver.wait_event("idle", 300)
        install(second_key, tls_key)
        install(second_cert, tls_crt)
        wait_until(lambda: "TLS certificate reloaded" in server.log_path.read_text(), 30,
                   "stoker to reload its certificate")
        result = driver.wait(timeout=300)
        assert len(result["results"]) == 2
        for r in result["results"]:
            assert r["count"] == 1_000_000
        log = driver.log()
        assert "re-attached" not in log, log[-3000:]

        # The command-line client over TLS: the server's CA and a client certificate.
        apps = subprocess.run(
            [str(STOKER), "apps", "--server", f"https://localhost:{server.port}",
             "--work-dir", str(work_dir), "--tls-ca", str(certs / "server-ca.pem"),
             "--tls-cert", str(driver_cert), "--tls-key", str(driver_key)],
            capture_output=True, text=True, timeout=30,
        )
        assert apps.returncode == 0, apps.stderr
        assert apps.stdout.startswith("APP"), apps.stdout
        # A plaintext driver gets nowhere.
        plain = subprocess.run(
            [str(STOKER), "apps", "--server", f"http://{server.address}",
             "--work-dir", str(work_dir)],
            capture_output=True, text=True, timeout=30,
        )
        assert plain.returncode != 0
    finally:
        server.stop()
