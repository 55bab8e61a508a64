"""The fault matrix of tests/chaos/chaos.py, quick: each ramp case once (a-e: stoker SIGKILL,
API server blackholed, watch expiry, driver SIGKILL, kube-apiserver SIGKILL + restart), with a small
ramp, on a test bed of its own (the chaos test bed serves pods without the API server's watch cache,
and its etcd gets compacted). The loss figures must be 0. `make chaos` runs the full matrix, with
cases f (stoker killed at the claim of 200 adopted pods), g (a real shuffle job through a stoker
and an API server kill), h (a real shuffle job through an API server kill alone), i (a real
shuffle job whose node is lost) and j (a real shuffle job through two stoker replicas whose leader
is SIGKILLed), which `make chaos-quick` runs once each."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chaos"))

import chaos  # noqa: E402

N = 60
CASES = ["a", "b", "c", "d", "e"]


def test_fault_matrix_quick(tmp_path):
    rows, _ = chaos.run_matrix(runs=1, n=N, cases=CASES, blackhole_s=20, qps=10, work=tmp_path)
    summary = chaos.summarize(rows)
    print("\n" + chaos.table(summary))
    assert [s["case"] for s in summary] and len(rows) == len(CASES)
    for r in rows:
        assert "error" not in r, r
        # A fault that came after the ramp tests less: the pace (--kube-qps) must keep it inside.
        assert r["created_at_fault"] < N, r
        for k in chaos.LOSS:
            assert not r.get(k), (k, r)
    assert not chaos.failed(summary)
