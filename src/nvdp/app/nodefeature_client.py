"""`labels_output.NodeFeatureClient` on `kube.KubeClient`, for `--use-node-feature-api=true`.

The labeller's outputs are synchronous (a file write), the client is asyncio: this adapter runs
the client on its own event loop in one worker thread and waits for each call, so a write of the
NodeFeature takes as long as its API calls (each bounded by the client's request timeout) and
the labeller's loop handles its signals once the write is over. Imported only in that mode, so
the file and stdout modes never load the client.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from nvdp.kube.client import NODE_FEATURE, CustomType, KubeClient
from nvdp.kube.connection import ClientConfig

T = TypeVar("T")


class KubeNodeFeatureClient:
    """Resource handling: owns the worker thread, its loop and the `KubeClient`; `close()` frees them."""

    def __init__(self, config: ClientConfig) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nvdp-kube", daemon=True)
        self._thread.start()
        self._client = self._call(self._open(config))  # built on its loop, where its connections live

    @staticmethod
    async def _open(config: ClientConfig) -> KubeClient:
        return KubeClient(config)

    def _call(self, call: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(call, self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._call(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    @staticmethod
    def _kind(group: str, version: str, plural: str) -> CustomType:
        if (group, version, plural) == (NODE_FEATURE.group, NODE_FEATURE.version, NODE_FEATURE.plural):
            return NODE_FEATURE
        raise ValueError(f"unknown custom resource {plural}.{group}/{version}")

    def get_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                     name: str) -> dict[str, Any] | None:
        return self._call(self._client.get_object(self._kind(group, version, plural), namespace, name))

    def create_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                        body: dict[str, Any]) -> dict[str, Any]:
        return self._call(self._client.create_object(self._kind(group, version, plural), namespace, body))

    def replace_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                         name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call(self._client.replace_object(self._kind(group, version, plural), namespace, body))

    def get_namespaced_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._call(self._client.get_pod(namespace, name))
