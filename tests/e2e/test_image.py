"""The image of deploy/Dockerfile, built here with buildah (scripts/image.sh: no registry, the
base images replaced by stand-ins made from Debian 12 packages) and started with podman as the
Deployment runs it: uid 65532, read-only root filesystem, no capabilities, an emptyDir-like
work directory, the admin token from the environment. It answers on 127.0.0.1 (host network).

By default the image's build stage is replaced by target/debug/stoker (seconds); `make image`
builds the whole Dockerfile from source and runs this file against it (STOKER_IMAGE)."""
import json
import os
import re
import subprocess
import tomllib
import urllib.request
import uuid

import pytest

from conftest import ROOT, STOKER, free_port, wait_until

SCRIPT = ROOT / "scripts" / "image.sh"
ADMIN_TOKEN = "image-test-admin-token-0123456789"


def podman_env():
    out = subprocess.run([str(SCRIPT), "env"], capture_output=True, text=True, check=True)
    env = dict(os.environ)
    for word in out.stdout.split():
        if "=" in word:
            name, value = word.split("=", 1)
            env[name] = value
    return env


def podman(env, *args, check=True, timeout=60):
    out = subprocess.run(["podman", *args], env=env, capture_output=True, text=True,
                         timeout=timeout)
    if check:
        assert out.returncode == 0, f"podman {' '.join(args)}: {out.stderr}"
    return out


def test_dockerfile_copies_every_workspace_member():
    """The build stage's `cargo build --locked` loads every workspace member: a member that the
    Dockerfile does not COPY breaks the image (as tests/bench/rpc did). Checked here without a
    build, since `make test` replaces the build stage."""
    members = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["members"]
    lines = (ROOT / "deploy" / "Dockerfile").read_text().split("\n")
    build_stage = lines[: next(i for i, l in enumerate(lines) if l.startswith("FROM ") and i > 0
                               and "AS build" not in l)]
    copied = [w for l in build_stage if l.startswith("COPY ") for w in l.split()[1:-1]
              if not w.startswith("--")]
    missing = [m for m in members
               if not any(m == c or m.startswith(c.rstrip("/") + "/") for c in copied)]
    assert not missing, f"deploy/Dockerfile does not COPY the workspace members {missing}"


@pytest.fixture(scope="module")
def image():
    """(tag, env): STOKER_IMAGE if set (built by `make image`), else built from STOKER."""
    env = podman_env()
    tag = os.environ.get("STOKER_IMAGE")
    if not tag:
        out = subprocess.run(
            [str(SCRIPT), "build", "--binary", str(STOKER), "--tag", "localhost/stoker:e2e"],
            capture_output=True, text=True, timeout=600,
        )
        assert out.returncode == 0, out.stderr[-4000:]
        tag = out.stdout.strip().splitlines()[-1]
    return tag, env


def test_image_is_the_dockerfiles_runtime_stage(image):
    tag, env = image
    [info] = json.loads(podman(env, "image", "inspect", tag).stdout)
    config = info["Config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["/usr/local/bin/stoker"]
    assert config["Cmd"][:3] == ["serve", "--backend", "kubernetes"]
    assert set(config["ExposedPorts"]) == {"7077/tcp", "9077/tcp"}
    # No shell in a distroless image: a command other than stoker cannot start.
    assert podman(env, "run", "--rm", "--entrypoint", "/bin/sh", tag, "-c", "true",
                  check=False).returncode != 0
    # The Kubernetes backend (the image's CMD) looks for a kubeconfig in $HOME, /home/nonroot:
    # without a cluster it must say so, not fail on a home directory it cannot read.
    kube = podman(env, "run", "--rm", "--read-only", "-e", f"STOKER_ADMIN_TOKEN={ADMIN_TOKEN}", tag,
                  "serve", "--backend", "kubernetes", "--listen", f"127.0.0.1:{free_port()}",
                  "--metrics-listen", f"127.0.0.1:{free_port()}", check=False)
    assert kube.returncode != 0 and "no Kubernetes configuration" in kube.stderr, kube.stderr
    assert "Permission denied" not in kube.stderr, kube.stderr
    version = podman(env, "run", "--rm", tag, "--version").stdout.strip()
    assert version.startswith("stoker ")
    if not os.environ.get("STOKER_IMAGE"):
        host = subprocess.run([str(STOKER), "--version"], capture_output=True, text=True)
        assert version == host.stdout.strip()


def test_image_serves_as_the_deployment_runs_it(image, tmp_path):
    tag, env = image
    port, metrics = free_port(), free_port()
    # The local backend wants a Spark installation (jars/); the server starts without one in use.
    (tmp_path / "spark" / "jars").mkdir(parents=True)
    name = f"stoker-e2e-{uuid.uuid4().hex[:8]}"
    podman(env, "run", "-d", "--name", name,
           "--read-only", "--read-only-tmpfs=false", "--cap-drop", "ALL",
           "--security-opt", "no-new-privileges",
           # An emptyDir is a directory of mode 0777: stoker must not write its token there.
           "--mount", "type=tmpfs,destination=/tmp/stoker,tmpfs-mode=0777",
           "-e", f"STOKER_ADMIN_TOKEN={ADMIN_TOKEN}",
           "-v", f"{tmp_path / 'spark'}:/opt/spark:ro",
           tag, "serve", "--backend", "local", "--spark-home", "/opt/spark",
           "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{metrics}",
           "--work-dir", "/tmp/stoker", "--log-format", "json")
    try:
        def scrape():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=2) as r:
                    return r.read().decode()
            except OSError:
                state = podman(env, "inspect", name, "--format", "{{.State.Status}}").stdout
                assert state.strip() == "running", (lambda o: o.stdout + o.stderr)(podman(env, "logs", name))
                return None

        text = wait_until(scrape, 30, "the image's metrics endpoint")
        assert "stoker_applications 0" in text
        # gRPC with the admin token, by the image's own client.
        apps = podman(env, "exec", name, "/usr/local/bin/stoker", "apps",
                      "--server", f"http://127.0.0.1:{port}", "--token", ADMIN_TOKEN)
        assert apps.stdout.split()[:2] == ["APP", "NAME"]
        # and refused with another token, from the host.
        wrong = subprocess.run([str(STOKER), "apps", "--server", f"http://127.0.0.1:{port}",
                                "--token", "not-the-admin-token-at-all"],
                               capture_output=True, text=True, timeout=30)
        assert wrong.returncode != 0 and "PermissionDenied" in wrong.stderr
        top = podman(env, "top", name, "huser", "args").stdout
        assert "65532" in top and "/usr/local/bin/stoker serve" in top
        # SIGTERM (what the kubelet sends): a clean stop, exit 0.
        podman(env, "stop", "-t", "20", name)
        code = podman(env, "inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip()
        assert code == "0", (lambda o: o.stdout + o.stderr)(podman(env, "logs", name))
    finally:
        podman(env, "rm", "-f", name, check=False)


def test_image_starts_as_deploy_base_runs_it_without_the_optional_admin_secret(image, tmp_path):
    """deploy/base's work directory inside its emptyDir (a 0777 directory), and no
    STOKER_ADMIN_TOKEN (the Secret stoker-admin is optional and deploy/ does not create it):
    stoker must start, keeping its admin token in a directory it makes private."""
    tag, env = image
    text = (ROOT / "deploy" / "base" / "deployment.yaml").read_text()
    work_dir = re.search(r"--work-dir=(\S+)", text).group(1)
    mount = re.search(r"- name: work\n\s+mountPath: (\S+)", text).group(1)
    assert work_dir.startswith(mount + "/") or work_dir == mount, (work_dir, mount)
    (tmp_path / "spark" / "jars").mkdir(parents=True)
    port, metrics = free_port(), free_port()
    name = f"stoker-e2e-{uuid.uuid4().hex[:8]}"
    podman(env, "run", "-d", "--name", name, "--read-only", "--cap-drop", "ALL",
           "--mount", f"type=tmpfs,destination={mount},tmpfs-mode=0777",
           "-v", f"{tmp_path / 'spark'}:/opt/spark:ro",
           tag, "serve", "--backend", "local", "--spark-home", "/opt/spark",
           "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{metrics}",
           "--work-dir", work_dir)
    try:
        def started():
            state = podman(env, "inspect", name, "--format", "{{.State.Status}}").stdout.strip()
            assert state == "running", (lambda o: o.stdout + o.stderr)(podman(env, "logs", name))
            return "admin token written" in (lambda o: o.stdout + o.stderr)(podman(env, "logs", name))
        wait_until(started, 30, "stoker in the image to start and write its admin token")
        # The image's own client finds the token in the work directory.
        apps = podman(env, "exec", name, "/usr/local/bin/stoker", "apps",
                      "--server", f"http://127.0.0.1:{port}", "--work-dir", work_dir)
        assert apps.stdout.split()[:2] == ["APP", "NAME"], apps.stdout + apps.stderr
    finally:
        podman(env, "rm", "-f", name, check=False)
