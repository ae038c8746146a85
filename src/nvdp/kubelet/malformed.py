"""Requests whose bytes do not decode: INVALID_ARGUMENT with a clear message, one log line.

Left to grpc, a request that fails to parse (broken wire format, a string field that is not
UTF-8) is answered UNKNOWN with a Python class name in the details, and grpc's Cython layer logs
a traceback for every such request. This interceptor gives every handler a deserializer that
never raises: a request that does not decode becomes a `Malformed` value, which the wrapped
handler refuses with INVALID_ARGUMENT before any of our code sees it. The log line is rate
limited (`RepeatedLog`: the first per method and minute, then a count).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from nvdp.ops.repeated_log import RepeatedLog

log = logging.getLogger("nvdp.server")  # the resource servers' logger: operators filter on it

Context = grpc.aio.ServicerContext[Any, Any]
Deserializer = Callable[[bytes], Any]
if TYPE_CHECKING:  # RpcMethodHandler is generic only in the type stubs
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    Continuation: TypeAlias = Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]


@dataclass(frozen=True)
class Malformed:
    """What a request that did not decode becomes: the reason, for the caller and the log."""

    reason: str


def _type_name(deserializer: Deserializer) -> str:
    owner = getattr(deserializer, "__self__", None)  # Message.FromString is bound to its class
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "message"))


def safe(deserializer: Deserializer | None) -> Deserializer | None:
    if deserializer is None:
        return None
    type_name = _type_name(deserializer)

    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # DecodeError ("Wire format was corrupt", "String field had bad UTF-8"...)
            return Malformed(f"cannot decode it as {type_name}: {exc}")

    return decode


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Refuses requests that do not decode; everything else passes through unchanged."""

    def __init__(self, resource: str) -> None:
        self.resource = resource
        self._log = RepeatedLog(log, logging.WARNING, "malformed request refused",
                                "malformed requests refused (repeats)")

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        decode = safe(handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary), request_deserializer=decode,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream), request_deserializer=decode,
                response_serializer=handler.response_serializer)
        return handler  # the DevicePlugin service has no client-streaming methods

    async def _refuse(self, method: str, request: Malformed, context: Context) -> None:
        fields = {"resource": self.resource, "method": method}
        self._log.note(method, {**fields, "error": request.reason}, fields)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {method} request: {request.reason}")

    def _unary(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: Context) -> Any:
            if isinstance(request, Malformed):
                await self._refuse(method, request, context)
            return await behaviour(request, context)

        return call

    def _stream(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def call(request: Any, context: Context) -> AsyncIterator[Any]:
            if isinstance(request, Malformed):
                await self._refuse(method, request, context)
            async for response in behaviour(request, context):
                yield response

        return call
