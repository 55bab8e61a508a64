"""End-to-end: drivers act as themselves. On the test bed (RBAC, Pod Security admission, real
ServiceAccount tokens from the API server's TokenRequest), stoker runs with --auth kubernetes:
every call carries the driver's token, the API server reviews it, and executor pods are created
by impersonating the driver, so the API server judges the driver's own rights."""
import subprocess

import pytest

from conftest import STOKER, wait_until
from test_kubernetes import (_driver_tokens, driver_service_account, driver_token, k8s_args,  # noqa: F401
                             kube, namespaces, pods_of)


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
            [str(STOKER), *args, "--server", f"http://{kube.address}", "--bearer-token-file", str(token)],
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
