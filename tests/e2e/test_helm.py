"""The Helm chart (deploy/helm/stoker): `helm lint`; its default rendering is deploy/base's (the
drift check: the two cannot part without this failing); non-default values render what they say;
and the chart installed on the test bed (a server-side dry run, then `helm install`) runs a Spark
job through stoker under the installed ServiceAccount; `helm upgrade` to other values moves the
release's objects with them, and `helm uninstall` leaves none of its objects behind.

`helm` is built from its Go module by scripts/helm.sh (cached; scripts/setup.sh builds it once).
The stoker image cannot run on the test bed's process kubelet (it runs containers as local
processes of the apache/spark image's executor role), so the Deployment is installed with 0
replicas and the stoker binary runs here with the installed ServiceAccount's token, the rendered
Deployment's own arguments and environment, and the files of its ConfigMap and Secret volumes
read back from the API server, as test_deploy_manifests_rbac_is_enough_and_no_more does for
deploy/base."""
import base64
import json
import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, STOKER, wait_until
import test_kubernetes
from test_kubernetes import KubeStoker, check_result, k8s_args, kubeconfig_for, namespaces, pods_of  # noqa: F401 (a fixture)
from test_tls import SERVER_EXT, issue, make_ca

CHART = ROOT / "deploy" / "helm" / "stoker"
BASE = ROOT / "deploy" / "base"


@pytest.fixture
def driver_tokens(testbed, tmp_path):
    """test_kubernetes' driver tokens (k8s_args), for the one test here that uses the test bed:
    its autouse fixture, imported, would start the test bed for the rendering tests too."""
    test_kubernetes._TESTBED = testbed
    test_kubernetes._TOKENS.clear()
    test_kubernetes._TOKENS["dir"] = tmp_path
    yield
    test_kubernetes._TOKENS.clear()


@pytest.fixture(scope="module")
def helm():
    """The helm binary of scripts/helm.sh (built from its Go module when not cached)."""
    out = subprocess.run([str(ROOT / "scripts" / "helm.sh")], capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr[-3000:]
    path = Path(out.stdout.strip().splitlines()[-1])
    assert path.is_file(), path
    return path


def run_helm(helm, *args, env=None, check=True, tmp=None):
    env = dict(env or os.environ)
    # helm's own cache, config and data folders: not the user's.
    home = Path(tmp or "/tmp") / "helm-home"
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env[var] = str(home / var.lower())
    out = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=300, env=env)
    if check:
        assert out.returncode == 0, f"helm {' '.join(args)} failed: {out.stderr[-3000:]}"
    return out


def objects(yaml_text):
    """The objects of a YAML stream, as JSON (kubectl, offline: the test venv has no YAML parser),
    with empty annotations dropped (kubectl adds them)."""
    out = subprocess.run(["kubectl", "annotate", "--local", "-f", "-", "stoker.dev/none-", "-o", "json"],
                         input=yaml_text, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "KUBECONFIG": "/nonexistent"})
    assert out.returncode == 0, out.stderr[-3000:]
    decoder, text, pos, objs = json.JSONDecoder(), out.stdout, 0, []
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            break
        obj, pos = decoder.raw_decode(text, pos)
        for o in obj["items"] if obj.get("kind") == "List" else [obj]:
            if not o["metadata"].get("annotations"):
                o["metadata"].pop("annotations", None)
            objs.append(o)
    return objs


def keyed(objs):
    out = {}
    for o in objs:
        key = (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])
        assert key not in out, f"{key} rendered twice"
        out[key] = o
    return out


def template(helm, *args, namespace="stoker"):
    return run_helm(helm, "template", "stoker", str(CHART), "--namespace", namespace, *args).stdout


def rendered(helm, *args, namespace="stoker"):
    return keyed(objects(template(helm, *args, namespace=namespace)))


def kustomized():
    out = subprocess.run(["kubectl", "kustomize", str(BASE)], capture_output=True, text=True, check=True)
    return keyed(objects(out.stdout))


def container(objs, namespace="stoker"):
    return objs[("Deployment", namespace, "stoker")]["spec"]["template"]["spec"]["containers"][0]


def test_helm_lint(helm, tmp_path):
    out = run_helm(helm, "lint", "--strict", str(CHART), tmp=tmp_path)
    assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout, out.stdout
    values = tmp_path / "values.yaml"
    values.write_text(NON_DEFAULT_VALUES)
    out = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(values), tmp=tmp_path)
    assert "0 chart(s) failed" in out.stdout, out.stdout


def test_default_values_render_deploy_base(helm):
    """The drift check: the chart's defaults are deploy/base, object for object, field for field.
    The Namespace only with namespace.create (by default it is the release's own namespace:
    `helm install --create-namespace`)."""
    base = kustomized()
    with_ns = rendered(helm, "--set", "namespace.create=true")
    assert sorted(with_ns) == sorted(base)
    for key in base:
        assert with_ns[key] == base[key], (key, json.dumps(with_ns[key], indent=1), json.dumps(base[key], indent=1))
    default = rendered(helm)
    assert sorted(default) == sorted(k for k in base if k[0] != "Namespace")
    for key in default:
        assert default[key] == base[key], key


QUEUE_FILE = """default_queue = "adhoc"

[capacity]
executors = 40

[[queues]]
name = "adhoc"
weight = 1
allow = ["*"]
"""

NON_DEFAULT_VALUES = """
replicaCount: 3
image:
  repository: registry.example/stoker
  tag: 0.2.0
  pullPolicy: IfNotPresent
driverNamespaces: [team-a, team-b]
allowedNamespaces: [team-a, team-b]
allowedNamespaceSelector: stoker.dev/serve=true
auth:
  audience: spark-drivers
tls:
  enabled: true
  secretName: my-stoker-cert
queues:
  file: |
""" + textwrap.indent(QUEUE_FILE, "    ", lambda line: line.strip()) + """resources:
  requests: {cpu: 250m, memory: 256Mi}
  limits: {memory: 1Gi}
extraArgs: ["--kube-qps=400"]
"""


def test_non_default_values_render_what_they_say(helm, tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(NON_DEFAULT_VALUES)
    objs = rendered(helm, "-f", str(values), namespace="spark-system")
    ns = "spark-system"
    deploy = objs[("Deployment", ns, "stoker")]
    assert deploy["spec"]["replicas"] == 3
    assert deploy["spec"]["strategy"] == {"type": "RollingUpdate",
                                         "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    c = container(objs, ns)
    assert c["image"] == "registry.example/stoker:0.2.0" and c["imagePullPolicy"] == "IfNotPresent"
    args = c["args"]
    for arg in ("--leader-elect", "--allowed-namespaces=team-a,team-b",
                "--allowed-namespace-selector=stoker.dev/serve=true", "--auth-audience=spark-drivers",
                "--tls-cert=/etc/stoker/tls/tls.crt", "--tls-key=/etc/stoker/tls/tls.key", "--metrics-tls",
                "--queues=/etc/stoker/queues/queues.toml", "--kube-qps=400"):
        assert arg in args, (arg, args)
    assert c["resources"] == {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    assert c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS" == c["livenessProbe"]["httpGet"]["scheme"]
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"] == {"name": "tls", "secret": {"secretName": "my-stoker-cert"}}
    assert {"name": "tls", "mountPath": "/etc/stoker/tls", "readOnly": True} in c["volumeMounts"]
    # Every flag the Deployment passes is one stoker knows.
    help_text = subprocess.run([str(STOKER), "serve", "--help"], capture_output=True, text=True,
                               check=True).stdout
    for flag in {a.split("=")[0] for a in args if a.startswith("--")}:
        assert re.search(rf"\s{re.escape(flag)}\b", help_text), f"the chart passes unknown {flag}"
    # The queue file, word for word.
    assert objs[("ConfigMap", ns, "stoker-queues")]["data"]["queues.toml"] == QUEUE_FILE
    # Leader election: the Service selects the leader, a PDB keeps one replica, and every subject
    # is the ServiceAccount of the release's namespace.
    assert objs[("Service", ns, "stoker")]["spec"]["selector"] == {
        "app.kubernetes.io/name": "stoker", "stoker.dev/leader": "true"}
    assert objs[("PodDisruptionBudget", ns, "stoker")]["spec"]["minAvailable"] == 1
    subject = [{"kind": "ServiceAccount", "name": "stoker", "namespace": ns}]
    for team in ("team-a", "team-b"):
        binding = objs[("RoleBinding", team, "stoker-may-impersonate-drivers")]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                      "name": "stoker-impersonate-drivers"}
        assert binding["subjects"] == subject
    for key, o in objs.items():
        if o["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            assert o["subjects"] == subject, key
    # Nothing grants impersonation elsewhere; no cert-manager object without certManager.enabled.
    assert sorted(k[1] for k in objs if k[0] == "RoleBinding" and k[2] == "stoker-may-impersonate-drivers") \
        == ["team-a", "team-b"]
    assert not [k for k in objs if k[0] == "Certificate"]

    # The same with cert-manager issuing the Secret: a Certificate for the Service's names.
    objs = rendered(helm, "-f", str(values), "--set", "tls.certManager.enabled=true",
                    "--set", "tls.certManager.issuerRef.name=team-issuer", namespace=ns)
    cert = objs[("Certificate", ns, "stoker")]["spec"]
    assert cert["secretName"] == "my-stoker-cert"
    assert cert["issuerRef"] == {"kind": "ClusterIssuer", "name": "team-issuer"}
    assert cert["dnsNames"] == ["stoker", f"stoker.{ns}", f"stoker.{ns}.svc", f"stoker.{ns}.svc.cluster.local"]


def test_one_replica_runs_without_a_lease_and_two_without_one_are_refused(helm):
    objs = rendered(helm, "--set", "replicaCount=1")
    assert objs[("Deployment", "stoker", "stoker")]["spec"]["strategy"] == {"type": "Recreate"}
    assert "--leader-elect" not in container(objs)["args"]
    assert objs[("Service", "stoker", "stoker")]["spec"]["selector"] == {"app.kubernetes.io/name": "stoker"}
    assert not [k for k in objs if k[0] == "PodDisruptionBudget"]
    out = run_helm(helm, "template", "stoker", str(CHART), "--set", "leaderElection.enabled=false", check=False)
    assert out.returncode != 0 and "needs leaderElection.enabled" in out.stderr, out.stderr
    # Without impersonation: stoker writes with rights of its own, in the opted-in namespaces only.
    objs = rendered(helm, "--set", "auth.authz=subject-access-review", "--set", "driverNamespaces={team-a}")
    assert "--authz=subject-access-review" in container(objs)["args"]
    binding = objs[("RoleBinding", "team-a", "stoker-may-write-executors")]
    assert binding["roleRef"]["name"] == "stoker-write-executors"
    assert ("ClusterRole", "", "stoker-write-executors") in objs


def test_installed_chart_runs_a_job_and_uninstalls_clean(helm, testbed, process_kubelet, work_dir, driver_factory,
                                                          namespaces, driver_tokens, monkeypatch):
    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    release_ns = "stoker-helm"
    team = namespaces("helm-team")
    instance = f"helm-{os.getpid()}"
    # deploy/base's cluster-wide objects (same names) must not be there: the RBAC test removes
    # them when it ends.
    wait_until(lambda: not testbed.api.get_opt(
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/stoker-executors"), 60,
        "deploy/base's ClusterRoleBinding gone")
    # The certificate of the TLS Secret the chart mounts (for 127.0.0.1: stoker runs here).
    certs = work_dir / "certs"
    certs.mkdir()
    ca = make_ca(certs, "stoker-ca")
    cert, key = issue(certs, "stoker-ca", "stoker", SERVER_EXT)
    values = work_dir / "values.yaml"
    values.write_text(f"""
replicaCount: 0   # the image cannot run on the process kubelet: stoker runs here (see above)
leaderElection: {{enabled: true}}
instance: {instance}
driverNamespaces: [{team}]
allowedNamespaces: [{team}]
tls: {{enabled: true, secretName: stoker-serving}}
queues:
  file: |
    default_queue = "helm"
    [capacity]
    executors = 4
    [[queues]]
    name = "helm"
    weight = 1
    allow = ["*"]
""")
    env = testbed.client_env()
    manifest = template(helm, "-f", str(values), namespace=release_ns)
    objs = keyed(objects(manifest))
    testbed.kubectl("create", "namespace", release_ns)
    try:
        testbed.kubectl("create", "secret", "tls", "stoker-serving", "-n", release_ns,
                        f"--cert={cert}", f"--key={key}")
        # A server-side dry run first: the API server validates and admits every object.
        out = testbed.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=manifest)
        assert out.stdout.count("serverside-applied (server dry run)") == len(objs), out.stdout
        assert not testbed.api.get_opt(f"/apis/apps/v1/namespaces/{release_ns}/deployments/stoker")
        # Then for real, as a user installs it.
        run_helm(helm, "install", "stoker", str(CHART), "-n", release_ns, "-f", str(values), env=env, tmp=work_dir)
        for kind, ns, name in objs:
            assert testbed.kubectl("get", kind, name, *(["-n", ns] if ns else []), check=False).returncode == 0, \
                (kind, ns, name)
        sa = f"system:serviceaccount:{release_ns}:stoker"
        can = lambda *a: testbed.kubectl("auth", "can-i", *a, f"--as={sa}", check=False).stdout.strip()
        assert can("impersonate", "serviceaccounts", "-n", team) == "yes"
        for other in ("default", "kube-system"):
            assert can("impersonate", "serviceaccounts", "-n", other) == "no", other
        assert can("create", "pods", "-n", team) == "no"
        assert can("update", "leases", "-n", release_ns) == "yes"

        # The installed Deployment, run here: its arguments and environment, its volumes' files
        # read back from the API server, the installed ServiceAccount's token.
        deploy = testbed.api.get(f"/apis/apps/v1/namespaces/{release_ns}/deployments/stoker")
        assert deploy["spec"]["replicas"] == 0
        spec = deploy["spec"]["template"]["spec"]
        c = spec["containers"][0]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {}
        for m in c["volumeMounts"]:
            local = work_dir / "mounts" / m["name"]
            local.mkdir(parents=True)
            v = volumes[m["name"]]
            if "configMap" in v:
                data = testbed.api.get(f"/api/v1/namespaces/{release_ns}/configmaps/{v['configMap']['name']}")["data"]
            elif "secret" in v:
                raw = testbed.api.get(f"/api/v1/namespaces/{release_ns}/secrets/{v['secret']['secretName']}")["data"]
                data = {k: base64.b64decode(b).decode() for k, b in raw.items()}
            else:
                assert "emptyDir" in v, v
                data = {}
            for name, text in data.items():
                (local / name).write_text(text)
            mounts[m["mountPath"]] = local
        args = []
        for a in c["args"]:
            flag = a.split("=")[0]
            if a in ("serve", "--backend=kubernetes") or flag in ("--listen", "--metrics-listen", "--work-dir"):
                continue  # KubeStoker's own: the backend, 127.0.0.1 ports and this test's work dir
            for path, local in mounts.items():
                a = a.replace(path + "/", f"{local}/")
            args.append(a)
        assert "--leader-elect" in args and any(a.startswith("--tls-cert=") for a in args), args
        envs = {}
        for e in c["env"]:
            if "value" in e:
                envs[e["name"]] = e["value"]
            elif e["valueFrom"].get("fieldRef"):
                envs[e["name"]] = {"metadata.namespace": release_ns,
                                   "metadata.name": "stoker-helm-test"}[e["valueFrom"]["fieldRef"]["fieldPath"]]
        for name, value in envs.items():
            monkeypatch.setenv(name, value)
        assert envs["STOKER_KUBE_INSTANCE"] == instance
        # The leader labels its own pod (POD_NAME) for the Service: a stand-in of the Deployment's
        # pod, bound to a node that does not exist, so that nothing runs it.
        testbed.api.create(f"/api/v1/namespaces/{release_ns}/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": envs["POD_NAME"], "labels": deploy["spec"]["template"]["metadata"]["labels"]},
            "spec": {**spec, "nodeName": "no-such-node"}})
        token = testbed.kubectl("create", "token", "stoker", "-n", release_ns, "--duration=1h").stdout.strip()
        server = KubeStoker(work_dir, testbed, instance, lease_ttl=envs["STOKER_LEASE_TTL"],
                            kubeconfig=kubeconfig_for(testbed, work_dir / "stoker-sa.kubeconfig", token),
                            extra=args)
        server.tls_ca = ca
        server.start()
        try:
            wait_until(lambda: "leader: lease acquired" in server.log_path.read_text(), 60, "the Lease")
            assert testbed.api.get_opt(
                f"/apis/coordination.k8s.io/v1/namespaces/{release_ns}/leases/stoker-{instance}")
            driver = driver_factory(server, "--executors", "2", *k8s_args(team))
            check_result(driver.wait(timeout=300))
            wait_until(lambda: not pods_of(testbed, instance), 60, "executor pods deleted")
            # The Service the chart made selects the leader's pod.
            selector = ",".join(f"{k}={v}" for k, v in testbed.api.get(
                f"/api/v1/namespaces/{release_ns}/services/stoker")["spec"]["selector"].items())
            chosen = testbed.api.get(f"/api/v1/namespaces/{release_ns}/pods", labelSelector=selector)["items"]
            assert [p["metadata"]["name"] for p in chosen] == [envs["POD_NAME"]], selector
        finally:
            server.stop()
        testbed.api.delete_pod(envs["POD_NAME"], release_ns, force=True)
        log = server.log_path.read_text()
        assert "Forbidden" not in log
        # The queue file of the chart's ConfigMap was read and the application admitted to its queue.
        chosen = [json.loads(line) for line in log.splitlines()
                  if line.startswith("{") and "fair share: queue chosen" in line]
        assert [e.get("queue") for e in chosen] == ["helm"], chosen

        # An upgrade, as a platform team moves its drivers to another namespace and grows the
        # capacity: the release's objects follow the new values, and helm deletes what the new
        # revision no longer renders (the old namespace's RoleBindings).
        other = namespaces("helm-other")
        values_2 = work_dir / "values-2.yaml"
        values_2.write_text(values.read_text()
                            .replace(f"driverNamespaces: [{team}]", f"driverNamespaces: [{other}]")
                            .replace(f"allowedNamespaces: [{team}]", f"allowedNamespaces: [{other}]")
                            .replace("executors = 4", "executors = 6"))
        # What stoker wrote to its sizes ConfigMap (the chart ships it without data) must survive.
        sizes = f"/api/v1/namespaces/{release_ns}/configmaps/stoker-sizes"
        assert ("ConfigMap", release_ns, "stoker-sizes") in objs
        remembered = "v1\tetl\t0\t512\t384\t768\t576\t1796000000000\n"
        testbed.api.merge_patch(sizes, {"data": {"sizes.tsv": remembered}})
        objs_2 = keyed(objects(template(helm, "-f", str(values_2), namespace=release_ns)))
        assert any(ns == team for _, ns, _ in objs) and not any(ns == team for _, ns, _ in objs_2)
        run_helm(helm, "upgrade", "stoker", str(CHART), "-n", release_ns, "-f", str(values_2), env=env, tmp=work_dir)
        exists = lambda kind, ns, name: testbed.kubectl(
            "get", kind, name, *(["-n", ns] if ns else []), check=False).returncode == 0
        for key in objs_2:
            assert exists(*key), key
        for key in set(objs) - set(objs_2):
            assert not exists(*key), f"{key} left after the upgrade"
        assert can("impersonate", "serviceaccounts", "-n", other) == "yes"
        assert can("impersonate", "serviceaccounts", "-n", team) == "no"
        configmaps = [testbed.api.get(f"/api/v1/namespaces/{ns}/configmaps/{name}").get("data") or {}
                      for kind, ns, name in objs_2 if kind == "ConfigMap"]
        assert any("executors = 6" in text for data in configmaps for text in data.values()), configmaps
        upgraded = json.dumps(testbed.api.get(f"/apis/apps/v1/namespaces/{release_ns}/deployments/stoker")
                              ["spec"]["template"])
        assert other in upgraded and team not in upgraded, upgraded
        assert (testbed.api.get(sizes).get("data") or {}).get("sizes.tsv") == remembered, "sizes lost"
        history = json.loads(run_helm(helm, "history", "stoker", "-n", release_ns, "-o", "json",
                                      env=env, tmp=work_dir).stdout)
        assert [(h["revision"], h["status"]) for h in history] == [(1, "superseded"), (2, "deployed")], history

        run_helm(helm, "uninstall", "stoker", "-n", release_ns, env=env, tmp=work_dir)
        objs = {**objs, **objs_2}
        for kind, ns, name in objs:
            assert testbed.kubectl("get", kind, name, *(["-n", ns] if ns else []),
                                   check=False).returncode != 0, f"{kind} {ns}/{name} left after uninstall"
        # What is left in the namespace is not the release's: the test's Secret, and stoker's
        # Lease (runtime state, like its pods; gone with the namespace).
        left = testbed.kubectl("get", "all,configmaps,secrets,leases,roles,rolebindings,serviceaccounts",
                               "-n", release_ns, "-o", "name").stdout.split()
        assert sorted(left) == sorted([
            "configmap/kube-root-ca.crt", "secret/stoker-serving", f"lease.coordination.k8s.io/stoker-{instance}",
            "serviceaccount/default"]), left
    finally:
        run_helm(helm, "uninstall", "stoker", "-n", release_ns, "--ignore-not-found", env=env, check=False,
                 tmp=work_dir)
        testbed.kubectl("delete", "namespace", release_ns, "--wait=false", check=False)
