"""A raw gRPC client of stoker's API, generated from proto/ when first imported (grpcio-tools,
installed into the test venv by scripts/setup.sh): a caller that is not the plugin, such as
another team's driver or an attacker with a valid token of its own."""
import importlib
import importlib.resources
import sys
import tempfile
from pathlib import Path

import grpc
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
_OUT = Path(tempfile.mkdtemp(prefix="stoker-pb-"))
_code = protoc.main([
    "protoc", f"-I{ROOT / 'proto'}", f"-I{importlib.resources.files('grpc_tools') / '_proto'}",
    f"--python_out={_OUT}", f"--grpc_python_out={_OUT}", str(ROOT / "proto/stoker/v1/stoker.proto"),
])
assert _code == 0, f"protoc failed ({_code}) on proto/stoker/v1/stoker.proto"
sys.path.insert(0, str(_OUT))
pb = importlib.import_module("stoker.v1.stoker_pb2")
_rpc = importlib.import_module("stoker.v1.stoker_pb2_grpc")


class Client:
    """Calls stoker at `address` with `bearer` as the caller's Kubernetes token; over TLS when
    `ca` (a CA file) is given, else plaintext."""

    def __init__(self, address, bearer=None, ca=None):
        self.channel = (grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(ca).read_bytes()))
                        if ca else grpc.insecure_channel(address))
        self.stub = _rpc.ExecutorAllocatorStub(self.channel)
        self.bearer = bearer

    def as_(self, bearer):
        """The same channel, another caller."""
        other = Client.__new__(Client)
        other.channel, other.stub, other.bearer = self.channel, self.stub, bearer
        return other

    def _metadata(self):
        return [("authorization", f"Bearer {self.bearer}")] if self.bearer else []

    def call(self, method, request, timeout=20):
        return getattr(self.stub, method)(request, metadata=self._metadata(), timeout=timeout)

    def watch(self, app_id, token, timeout=5):
        """The first event of the application's stream (raises the call's error)."""
        stream = self.stub.WatchExecutors(pb.WatchExecutorsRequest(app_id=app_id, token=token),
                                          metadata=self._metadata(), timeout=timeout)
        return next(iter(stream))

    def register(self, app_id, namespace, executors=0, token=""):
        return self.call("RegisterApplication", registration(app_id, namespace, executors, token))

    def close(self):
        self.channel.close()


def registration(app_id, namespace, executors=0, token=""):
    return pb.RegisterApplicationRequest(
        app_id=app_id, app_name="raw-client", token=token,
        template=pb.ExecutorTemplate(
            driver_url="spark://CoarseGrainedScheduler@127.0.0.1:40000", spark_version="4.2.0",
            spark_user="raw", profiles=[pb.ResourceProfile(id=0, cores=1, heap_mib=512, overhead_mib=384)],
            kubernetes=pb.KubernetesSettings(namespace=namespace)),
        initial_targets=[pb.ProfileTarget(resource_profile_id=0, total=executors)])
