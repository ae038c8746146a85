"""The liveness call: does a resource server answer a real GetDevicePluginOptions on its socket?"""

from __future__ import annotations

import grpc

from nvdp.kubelet._proto import api_pb2 as pb
from nvdp.kubelet._proto import api_pb2_grpc as pb_grpc
from nvdp.ops.view import Check

# Sent with the liveness call so that the gRPC metrics count only the kubelet's calls.
PROBE_METADATA = (("nvdp-probe", "liveness"),)


async def answers(resource: str, socket_path: str, timeout: float) -> Check:
    name = f"server:{resource}"
    try:
        async with grpc.aio.insecure_channel(f"unix://{socket_path}") as channel:
            await pb_grpc.DevicePluginStub(channel).GetDevicePluginOptions(
                pb.Empty(), timeout=timeout, metadata=PROBE_METADATA
            )
    except grpc.aio.AioRpcError as exc:
        return Check(name, False, f"GetDevicePluginOptions on {socket_path}: {exc.code().name}")
    return Check(name, True)
