"""Connects resource servers to `PluginStats`: the Allocate hook and a gRPC interceptor.

The interceptor times every unary call (Allocate, GetPreferredAllocation,
GetDevicePluginOptions, PreStartContainer) and records its status code. For ListAndWatch, a
stream that lives as long as the kubelet, it records the time to the first message and counts
the streams open, which is how readiness knows that the kubelet is listening.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from nvdp.core.devices import Resource
from nvdp.kubelet.liveness import PROBE_METADATA
from nvdp.kubelet.server import PreStartHook, ResourceServer, ServingContext
from nvdp.ops.counters import PluginStats

Clock = Callable[[], float]
Context = grpc.aio.ServicerContext[Any, Any]
if TYPE_CHECKING:  # RpcMethodHandler is generic only in the type stubs
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    Continuation: TypeAlias = Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]


def instrumented_servers(
    stats: PluginStats, pre_start: PreStartHook | None = None
) -> Callable[[Resource, ServingContext, str], ResourceServer]:
    """The Manager's server factory: every new resource server counts into `stats` (and asks
    `pre_start` before container starts, with --gpu-hygiene)."""

    def build(resource: Resource, context: ServingContext, socket_dir: str) -> ResourceServer:
        return ResourceServer(
            resource,
            context,
            socket_dir,
            interceptors=(MetricsInterceptor(resource.name, stats),),
            on_allocate=stats.record_allocation,
            pre_start=pre_start,
        )

    return build


def _status(context: Context, error: BaseException | None) -> str:
    """The call's status code: the one set by abort()/set_code(), else from how it ended."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if error is None:
        return "OK"
    return "CANCELLED" if isinstance(error, asyncio.CancelledError) else "UNKNOWN"


def _from_probe(details: grpc.HandlerCallDetails) -> bool:
    return any(key == PROBE_METADATA[0][0] for key, _ in details.invocation_metadata or ())


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, resource: str, stats: PluginStats, clock: Clock = time.perf_counter) -> None:
        self.resource = resource
        self.stats = stats
        self.clock = clock
        # The timed handler per method, built once: the service's handlers never change, and
        # building one per call cost more than the Allocate handler itself (docs/benchmarks.md).
        self._timed: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or _from_probe(handler_call_details):
            return handler
        cached = self._timed.get(handler_call_details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        timed = self._timed_handler(handler_call_details.method.rsplit("/", 1)[-1], handler)
        self._timed[handler_call_details.method] = (handler, timed)
        return timed

    def _timed_handler(self, method: str, handler: Handler) -> Handler:
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _unary(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: Context) -> Any:
            start = self.clock()
            error: BaseException | None = None
            try:
                return await behaviour(request, context)
            except BaseException as exc:  # abort() raises; the status code is on the context
                error = exc
                raise
            finally:
                self.stats.record_rpc(self.resource, method, self.clock() - start, _status(context, error))

        return call

    def _stream(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def call(request: Any, context: Context) -> AsyncIterator[Any]:
            start = self.clock()
            first = True
            self.stats.stream_opened(self.resource)
            try:
                async for response in behaviour(request, context):
                    if first:
                        self.stats.record_rpc(self.resource, method, self.clock() - start, "OK")
                        first = False
                    yield response
            finally:
                self.stats.stream_closed(self.resource)

        return call
