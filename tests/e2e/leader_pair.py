"""Two stoker replicas of one instance with leader election (`stoker serve --leader-elect`: a
coordination.k8s.io Lease on the test bed's API server): their flags, the log lines that mark the
election, the start of a pair, and a log line's time. Shared by the end-to-end test
(test_leader_election.py) and the fault matrix's case j (tests/chaos/chaos.py)."""
import re
from datetime import datetime

from testbed import wait_until

LEASE_NAMESPACE = "default"
LEASE_DURATION_S = 15  # stoker's default (client-go's): a SIGKILLed leader's Lease expires after it
# A replica's first line about the election; then one of the next two.
STANDING_BY = "standing by until this replica holds the lease"
STANDBY = "standby: another replica leads"
ACQUIRED = "leader: lease acquired"
LISTENING = "gRPC listening"  # the leader's gRPC port is open (a standby has none)
# The first RPC a new leader serves for a driver of the old one: its re-registration (the backend
# hands the driver's pods back and logs this).
SERVED = "driver re-registered"


def args(identity):
    """`stoker serve` flags of a replica of the Lease `stoker-<instance>` in LEASE_NAMESPACE."""
    return ["--leader-elect", "--leader-elect-namespace", LEASE_NAMESPACE, "--leader-elect-identity", identity]


def lease_path(instance):
    return f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/stoker-{instance}"


def start_pair(a, b, timeout=60):
    """Starts replica `a`, waits until it holds the Lease and serves gRPC, then starts `b` and waits
    until it stands by. A replica has `start()` (returns once its log says it stands by until it
    holds the Lease), `first(text)` (its first log line holding `text`, or None) and `port_open()`."""
    a.start()
    wait_until(lambda: a.first(ACQUIRED), timeout, "replica a to lead")
    wait_until(a.port_open, timeout, "the leader's gRPC port")
    b.start()
    wait_until(lambda: b.first(STANDBY), timeout, "replica b to stand by")
    return a, b


def stamp(line):
    """A stoker log line's time, as seconds since the epoch: a JSON line's `timestamp` (`line` a
    dict, --log-format json) or a text line's first field (RFC 3339, UTC)."""
    text = line["timestamp"] if isinstance(line, dict) else line.split(None, 1)[0]
    text = re.sub(r"(\.\d{6})\d*", r"\1", text).replace("Z", "+00:00")
    return datetime.fromisoformat(text).timestamp()
