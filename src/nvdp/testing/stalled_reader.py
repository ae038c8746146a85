"""`python -m nvdp.testing.stalled_reader SOCKET [MESSAGES]`: a ListAndWatch client that stops reading.

It opens a ListAndWatch stream on a device plugin's socket, reads MESSAGES messages (default 1),
prints "stalled" and stops itself with SIGSTOP: the connection stays open and nothing reads it, so
the server's next large write fills the HTTP/2 flow-control window and blocks. BDP probing is off,
so the window stays at gRPC's 64 KiB default instead of growing while the first list arrives.
`nvdp.testing.process.StalledReader` starts it, waits for "stalled" and resumes or kills it.
"""

from __future__ import annotations

import os
import signal
import sys

import grpc

from nvdp.kubelet._proto import api_pb2 as pb
from nvdp.kubelet._proto import api_pb2_grpc as pb_grpc

OPTIONS = [("grpc.http2.lookahead_bytes", 16 * 1024 * 1024), ("grpc.max_receive_message_length", 64 * 1024 * 1024)]


def main(argv: list[str]) -> int:
    socket_path = argv[0]
    wanted = int(argv[1]) if len(argv) > 1 else 1
    with grpc.insecure_channel(f"unix://{socket_path}", options=OPTIONS) as channel:
        stream = pb_grpc.DevicePluginStub(channel).ListAndWatch(pb.Empty())
        for _ in range(wanted):
            next(stream)
        print("stalled", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
        for _ in stream:  # after SIGCONT: read on until the server ends the stream
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
