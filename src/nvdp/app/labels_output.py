"""Where GPU feature discovery's labels go: the NFD local feature file, stdout, or a NodeFeature.

- File (`--use-node-feature-api=false`): `key=value` lines sorted by key, written atomically (a
  hidden temporary file in the same folder, fsync, rename, mode 0644) so NFD's worker never reads
  half a file; NFD skips hidden files in features.d, so it never reads the temporary one either.
- Stdout: the same lines, for an empty path or `-`.
- NodeFeature API (the default, as upstream v0.19+): the object of `core.nodefeature`, created or
  updated through a `NodeFeatureClient` (app/nodefeature_client.py on kube.KubeClient), and not
  sent when nothing changed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, TextIO

from nvdp.config.options import Config
from nvdp.core import nodefeature
from nvdp.core.labels import label_lines
from nvdp.errors import ConfigError, LabelError

log = logging.getLogger("nvdp.gfd")

FILE_MODE = 0o644
STDOUT_PATHS = ("", "-")


class LabelOutput(Protocol):
    """One destination for the labels. `write` publishes them; `remove` takes them back on exit
    where upstream does (the file; a NodeFeature stays, owned by the DaemonSet)."""

    def write(self, labels: Mapping[str, str]) -> None: ...

    def remove(self) -> None: ...


class StreamOutput:
    """The label lines on a stream (stdout)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, labels: Mapping[str, str]) -> None:
        self._stream.write(label_lines(labels))
        self._stream.flush()

    def remove(self) -> None:
        """Nothing to take back from a stream."""


class FileOutput:
    """The NFD local feature file (features.d/gfd), replaced atomically on every write."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def write(self, labels: Mapping[str, str]) -> None:
        log.info("Writing labels to output file %s", self.path)
        try:
            write_atomically(self.path, label_lines(labels))
        except OSError as exc:
            raise LabelError(f"cannot write the labels to {self.path}: {exc.strerror or exc}") from exc

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def write_atomically(path: Path, text: str, mode: int = FILE_MODE) -> None:
    """Write `text` to `path` so that a reader sees the old file or the new one, never a part."""
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, mode)  # mkstemp creates 0600; NFD may run as another user
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)


class NodeFeatureClient(Protocol):
    """What the NodeFeature output needs of a Kubernetes API client. Objects are the API's JSON
    as dicts. `get_*` return None when the object does not exist; any other failure raises."""

    def get_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                     name: str) -> dict[str, Any] | None: ...

    def create_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                        body: dict[str, Any]) -> dict[str, Any]: ...

    def replace_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                         name: str, body: dict[str, Any]) -> dict[str, Any]: ...

    def get_namespaced_pod(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def close(self) -> None:
        """Free the connection (the labeller calls it when it stops or reloads)."""
        ...


class NodeFeatureOutput:
    """The labels as this node's NodeFeature object. Owner references come from GFD's own pod
    (POD_NAME); failing to read it is a warning, as upstream, and the object is sent without."""

    def __init__(self, client: NodeFeatureClient, node_name: str, namespace: str, pod_name: str = "") -> None:
        self._client = client
        self.node_name = node_name
        self.namespace = namespace
        self.pod_name = pod_name
        self.updates = 0  # creates and updates sent (tests, logs)

    def _owners(self) -> list[dict[str, Any]]:
        if not self.pod_name:
            return []
        try:
            pod = self._client.get_namespaced_pod(self.namespace, self.pod_name)
        except Exception as exc:  # any client failure here is only a warning, as upstream
            log.warning("cannot read pod %s/%s for the NodeFeature's owner references: %s",
                        self.namespace, self.pod_name, exc)
            return []
        return nodefeature.owner_references(pod)

    def write(self, labels: Mapping[str, str]) -> None:
        desired = nodefeature.node_feature(self.node_name, self.namespace, labels, self._owners())
        name = nodefeature.object_name(self.node_name)
        where = (nodefeature.GROUP, nodefeature.VERSION, self.namespace, nodefeature.PLURAL)
        existing = self._client.get_namespaced_custom_object(*where, name)
        if existing is None:
            log.info("creating NodeFeature object %s/%s", self.namespace, name)
            self._client.create_namespaced_custom_object(*where, desired)
            self.updates += 1
            return
        change = nodefeature.updated(existing, desired)
        if change is None:
            log.debug("no changes in NodeFeature object %s/%s, not updating", self.namespace, name)
            return
        log.info("updating NodeFeature object %s/%s", self.namespace, name)
        self._client.replace_namespaced_custom_object(*where, name, change)
        self.updates += 1

    def remove(self) -> None:
        """The NodeFeature stays: it is owned by the DaemonSet and the pod (garbage collected with them)."""


def open_output(cfg: Config, client: NodeFeatureClient | None, stdout: TextIO) -> LabelOutput:
    """The output the config asks for. ConfigError when the NodeFeature API mode cannot work."""
    if not cfg.use_node_feature_api:
        return StreamOutput(stdout) if cfg.output_file in STDOUT_PATHS else FileOutput(cfg.output_file)
    if not cfg.node_name:
        raise ConfigError("--node-name (NODE_NAME)", "required flag node-name not set (the NodeFeature API needs it)")
    if not cfg.namespace:
        raise ConfigError("--namespace (NAMESPACE)", "required flag namespace not set (the NodeFeature API needs it)")
    if client is None:  # the CLI always gives one (app/nodefeature_client.py); a caller that does not
        raise ConfigError("--use-node-feature-api", "no Kubernetes API client was given for the NodeFeature API; "
                          "run with --use-node-feature-api=false (USE_NODE_FEATURE_API=false) to write the "
                          f"NFD local feature file ({cfg.output_file or 'stdout'}) instead")
    return NodeFeatureOutput(client, cfg.node_name, cfg.namespace, cfg.pod_name)
