"""End-to-end: drivers act as themselves. On the test bed (RBAC, Pod Security admission, real
ServiceAccount tokens from the API server's TokenRequest), stoker runs with --auth kubernetes:
every call carries the driver's token, the API server reviews it, and executor pods are created
by impersonating the driver, so the API server judges the driver's own rights."""
import base64
import json
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from conftest import STOKER, wait_until
from grpc_client import Client, pb
from test_kubernetes import (_driver_tokens, check_result, driver_service_account, driver_token,  # noqa: F401
                             k8s_args, kube, namespaces, pods_of, running_pods)


def refused(driver, timeout=240):
    """The driver ended without finishing its job; its log."""
    try:
        code = driver.proc.wait(timeout=timeout)
    except Exception:
        driver.kill9()
        raise AssertionError(f"the driver did not give up:\n{driver.log()[-4000:]}")
    assert code != 0, "the job must not succeed"
    return driver.log()


def test_no_token_a_token_for_another_audience_or_of_a_deleted_account_is_unauthenticated(kube, testbed, driver_factory):
    no_token = driver_factory(kube, *k8s_args(token=False), "--conf", "spark.stoker.registration.timeout=5s")
    assert "UNAUTHENTICATED" in refused(no_token)
    wrong = driver_token(audience="https://kubernetes.default.svc")
    other = driver_factory(kube, *k8s_args(token=False), "--conf", "spark.stoker.registration.timeout=5s",
                           "--conf", f"spark.stoker.auth.tokenFile={wrong}")
    log = refused(other)
    assert "UNAUTHENTICATED" in log and "token" in log
    # A token of a ServiceAccount deleted since it was issued.
    gone = driver_token("default", sa="gone", edit=False)
    testbed.api.delete("/api/v1/namespaces/default/serviceaccounts/gone")
    orphan = driver_factory(kube, *k8s_args(token=False), "--conf", "spark.stoker.registration.timeout=5s",
                            "--conf", f"spark.stoker.auth.tokenFile={gone}")
    assert "UNAUTHENTICATED" in refused(orphan)
    assert not pods_of(testbed, kube.instance)
    assert "application" not in kube.cli("apps").stdout.split("\n", 1)[-1]


def test_a_namespace_the_driver_may_not_use_is_refused_at_registration(kube, testbed, driver_factory):
    driver = driver_factory(kube, *k8s_args("kube-system", token=False),
                            "--conf", f"spark.stoker.auth.tokenFile={driver_token('default')}",
                            "--conf", "spark.stoker.registration.timeout=5s")
    log = refused(driver)
    assert "PERMISSION_DENIED" in log and "may not create pods in namespace kube-system" in log, log[-3000:]
    assert not pods_of(testbed, kube.instance)


@pytest.mark.parametrize("authz", ["impersonate", "subject-access-review"])
def test_pods_are_created_with_the_drivers_rights_and_refusals_reach_the_driver(kube, testbed, driver_factory,
                                                                                 authz):
    if authz != "impersonate":
        kube.stop()
        kube.extra = ["--authz", authz]
        kube.start()
    # A ServiceAccount with no RBAC at all: its token is valid, its pods are not.
    driver_service_account("default", sa="nobody", edit=False)
    token = driver_token("default", sa="nobody", edit=False)
    driver = driver_factory(kube, "--executors", "1", "--max-failures", "2", *k8s_args(token=False),
                            "--conf", f"spark.stoker.auth.tokenFile={token}")
    log = refused(driver)
    expected = {
        "impersonate": 'is forbidden: User "system:serviceaccount:default:nobody" cannot create resource "pods"',
        "subject-access-review": "refused by a SubjectAccessReview: system:serviceaccount:default:nobody "
                                 "may not create pods in namespace default",
    }[authz]
    assert expected in log, log[-4000:]
    assert not pods_of(testbed, kube.instance)


def test_pod_security_admission_judges_the_drivers_pods(kube, testbed, driver_factory, namespaces):
    ns = namespaces("restricted-ns")
    testbed.api.merge_patch(f"/api/v1/namespaces/{ns}", {"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": "restricted"}}})
    driver = driver_factory(kube, "--executors", "1", "--max-failures", "2", *k8s_args(ns))
    log = refused(driver)
    assert "violates PodSecurity" in log and "restricted" in log, log[-4000:]
    assert not pods_of(testbed, kube.instance)
    # stoker keeps serving others.
    ok = driver_factory(kube, "--executors", "1", *k8s_args())
    assert ok.wait(timeout=300)["results"]


def test_an_admission_policy_on_the_drivers_identity_judges_the_drivers_pods(kube, testbed, driver_factory,
                                                                               namespaces):
    """A ValidatingAdmissionPolicy, for the whole cluster, refuses pods created by one team's
    ServiceAccount. Its driver may create pods by RBAC, yet its executor pods are refused with the
    policy's message in its log; another team's driver, under the same policy, runs its job. The
    API server saw each driver's own identity, not stoker's."""
    ns = namespaces("vap-team")
    denied = f"system:serviceaccount:{ns}:spark"
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": "stoker-e2e-no-pods-for-vap-team"},
        "spec": {"failurePolicy": "Fail",
                 "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"],
                                                         "operations": ["CREATE"], "resources": ["pods"]}]},
                 "validations": [{"expression": f"request.userInfo.username != '{denied}'",
                                  "message": "vap-team may not start pods today"}]}}
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": "stoker-e2e-no-pods-for-vap-team"},
        "spec": {"policyName": "stoker-e2e-no-pods-for-vap-team", "validationActions": ["Deny"]}}
    base = "/apis/admissionregistration.k8s.io/v1"
    testbed.api.create(f"{base}/validatingadmissionpolicies", policy)
    testbed.api.create(f"{base}/validatingadmissionpolicybindings", binding)
    try:
        driver_service_account(ns)
        probe = json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe"},
                            "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
        # The API server enforces a new policy once its informer has it: a server-side dry run as
        # the team's ServiceAccount says when.
        wait_until(lambda: "vap-team may not start pods today" in testbed.kubectl(
            "create", "--dry-run=server", "-n", ns, "--as", denied, "-f", "-", input=probe, check=False).stderr,
            30, "the policy enforced")
        driver = driver_factory(kube, "--executors", "1", "--max-failures", "2", *k8s_args(ns))
        log = refused(driver)
        assert "vap-team may not start pods today" in log and "ValidatingAdmissionPolicy" in log, log[-4000:]
        assert not pods_of(testbed, kube.instance)
        ok = driver_factory(kube, "--executors", "1", *k8s_args())
        check_result(ok.wait(timeout=300))
    finally:
        testbed.api.delete(f"{base}/validatingadmissionpolicybindings/stoker-e2e-no-pods-for-vap-team")
        testbed.api.delete(f"{base}/validatingadmissionpolicies/stoker-e2e-no-pods-for-vap-team")


def test_inspection_is_granted_by_kubernetes_rbac(kube, testbed, driver_factory):
    """`stoker apps` with a Kubernetes token instead of the admin token file: allowed for an
    identity bound to the ClusterRole stoker-viewer (deploy/base), refused otherwise."""
    testbed.kubectl("apply", "-f", "-", input="""
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: stoker-viewer}
rules:
- apiGroups: ["stoker.dev"]
  resources: ["applications"]
  verbs: ["get", "list"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: e2e-ops-views-stoker}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: stoker-viewer}
subjects: [{kind: ServiceAccount, name: ops, namespace: default}]
""")
    try:
        driver = driver_factory(kube, "--executors", "1", "--jobs", "2", "--pause-s", "60", *k8s_args())
        app_id = driver.wait_event("started", timeout=120)["app_id"]
        ops = driver_token("default", sa="ops", edit=False)
        nobody = driver_token("default", sa="nobody", edit=False)
        run = lambda token, *args: subprocess.run(
            [str(STOKER), *args, *kube.server_args(), "--bearer-token-file", str(token)],
            capture_output=True, text=True, timeout=30)
        listed = run(ops, "apps")
        assert listed.returncode == 0 and app_id in listed.stdout, listed.stderr
        shown = run(ops, "executors", app_id)
        assert shown.returncode == 0, shown.stderr
        refused_list = run(nobody, "apps")
        assert refused_list.returncode != 0 and "PermissionDenied" in refused_list.stderr, refused_list.stderr
        driver.kill9()
        # Its lease runs out and stoker deletes its pods (as the driver).
        wait_until(lambda: not pods_of(testbed, kube.instance), 60, "the killed driver's pods deleted")
    finally:
        testbed.kubectl("delete", "clusterrolebinding", "e2e-ops-views-stoker", "--wait=false", check=False)


def _b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def expired_token(testbed, namespace="default", sa="spark"):
    """A token of `sa` that expired a minute ago, signed with the test bed's ServiceAccount
    signing key exactly as the API server signs (the API server issues none shorter than 10
    minutes): a real token's claims, moved into the past."""
    real = driver_token(namespace, sa).read_text().strip()
    header, payload, _ = real.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    now = int(time.time())
    claims.update(iat=now - 900, nbf=now - 900, exp=now - 60)
    signed = f"{header}.{_b64(json.dumps(claims).encode())}"
    key = Path(testbed.env["CA_CERT"]).parent / "sa.key"
    assert key.exists(), f"the test bed's signing key is not at {key}"
    signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(key)], input=signed.encode(),
                               capture_output=True, check=True).stdout
    return f"{signed}.{_b64(signature)}", real


def code_of(call):
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_an_expired_token_is_unauthenticated(kube, testbed):
    expired, real = expired_token(testbed)
    client = Client(kube.address, ca=kube.tls_ca)
    try:
        code, details = code_of(lambda: client.as_(expired).register("expired", "default"))
        assert code == grpc.StatusCode.UNAUTHENTICATED, (code, details)
        # The same claims, unexpired and signed by the API server, are accepted: the refusal is
        # the expiry's.
        assert code_of(lambda: client.as_(real).register("fresh", "default"))[0] == grpc.StatusCode.OK
    finally:
        client.close()


def test_two_drivers_of_two_namespaces_cannot_reach_each_other(kube, testbed, driver_factory, namespaces):
    """A real Spark driver in `alpha` and another team's ServiceAccount in `beta` with a valid
    token of its own: beta can neither see, kill, watch, resize, unregister nor re-attach to
    alpha's applications, with or without their application token."""
    alpha, beta = namespaces("alpha"), namespaces("beta")
    token_a, token_b = driver_token(alpha).read_text().strip(), driver_token(beta).read_text().strip()
    driver = driver_factory(kube, "--executors", "1", "--jobs", "2", "--pause-s", "45", *k8s_args(alpha))
    real_app = driver.wait_event("started", timeout=120)["app_id"]
    wait_until(lambda: running_pods(testbed, kube.instance, real_app), 120, "alpha's executor pod running")
    client = Client(kube.address, ca=kube.tls_ca)
    a, b = client.as_(token_a), client.as_(token_b)
    raw_token = own_token = ""
    try:
        # A second application of alpha's ServiceAccount, so that the test holds its token.
        raw_token = a.register("alpha-raw", alpha).token
        own_token = b.register("beta-own", beta).token
        assert own_token, "beta may use its own namespace"
        for app_id, app_token in [(real_app, ""), ("alpha-raw", raw_token)]:
            attempts = {
                "get": lambda: b.call("GetApplication", pb.GetApplicationRequest(app_id=app_id, token=app_token)),
                "watch": lambda: b.watch(app_id, app_token),
                "kill": lambda: b.call("KillExecutors", pb.KillExecutorsRequest(
                    app_id=app_id, token=app_token, executor_ids=["1"], adjust_target=True)),
                "resize": lambda: b.call("RequestTotalExecutors", pb.RequestTotalExecutorsRequest(
                    app_id=app_id, token=app_token, targets=[pb.ProfileTarget(resource_profile_id=0, total=5)])),
                "heartbeat": lambda: b.call("Heartbeat", pb.HeartbeatRequest(app_id=app_id, token=app_token)),
                "re-attach": lambda: b.register(app_id, beta, token=app_token),
                "re-attach in alpha": lambda: b.register(app_id, alpha, token=app_token),
                "unregister": lambda: b.call("UnregisterApplication", pb.UnregisterApplicationRequest(
                    app_id=app_id, token=app_token)),
            }
            for what, attempt in attempts.items():
                code, details = code_of(attempt)
                # Without the application's token a call is not even weighed (UNAUTHENTICATED:
                # "token: missing"); with it, the identity is what refuses.
                expected = ({grpc.StatusCode.PERMISSION_DENIED} if app_token else
                            {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED})
                assert code in expected, (app_id, bool(app_token), what, code, details)
        listed = code_of(lambda: b.call("ListApplications", pb.ListApplicationsRequest()))
        assert listed[0] == grpc.StatusCode.PERMISSION_DENIED, listed
        # The owner still can (the refusals above are the identity's, not a broken call).
        assert a.call("Heartbeat", pb.HeartbeatRequest(app_id="alpha-raw", token=raw_token)).incarnation
        assert a.call("GetApplication", pb.GetApplicationRequest(app_id="alpha-raw", token=raw_token)).app_id
        # Nothing of alpha's changed: the driver's executor was never killed and its job ends right.
        check_result(driver.wait(timeout=300))
        assert "stoker: executor 1 exited" not in driver.log()
        assert not [p for p in pods_of(testbed, kube.instance) if p["metadata"]["namespace"] == beta]
    finally:
        for who, app_id, token in [(a, "alpha-raw", raw_token), (b, "beta-own", own_token)]:
            code_of(lambda: who.call("UnregisterApplication", pb.UnregisterApplicationRequest(app_id=app_id, token=token)))
        client.close()


def test_a_namespace_selector_serves_only_namespaces_labelled_to_opt_in(kube, testbed, driver_factory, namespaces):
    opted, other = namespaces("opted-in"), namespaces("not-opted-in")
    testbed.api.merge_patch(f"/api/v1/namespaces/{opted}", {"metadata": {"labels": {"stoker.dev/serve": "true"}}})
    kube.stop()
    kube.extra = ["--allowed-namespace-selector", "stoker.dev/serve=true"]
    kube.start()
    client = Client(kube.address, ca=kube.tls_ca)
    try:
        code, details = code_of(lambda: client.as_(driver_token(other).read_text().strip()).register("x", other))
        assert code == grpc.StatusCode.PERMISSION_DENIED, (code, details)
        assert "not-opted-in is not one this stoker serves" in details and "stoker.dev/serve=true" in details, details
    finally:
        client.close()
    driver = driver_factory(kube, "--executors", "1", *k8s_args(opted))
    check_result(driver.wait(timeout=300))
    assert not testbed.api.pods(other)
    # A selector the API server cannot parse stops stoker at its start, naming the flag.
    bad = subprocess.run([str(STOKER), "serve", "--backend", "kubernetes", "--listen", "127.0.0.1:0",
                          "--metrics-listen", "127.0.0.1:0", "--work-dir", str(kube.work_dir / "bad"),
                          "--kube-instance", "bad-selector", "--allowed-namespace-selector", "a b=(c"],
                         env=testbed.client_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--allowed-namespace-selector" in bad.stderr, bad.stderr[-2000:]
