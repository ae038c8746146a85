"""Where the labels go: the NFD feature file (atomic, sorted, 0644), stdout, and the NodeFeature
object (built purely in core.nodefeature, sent through a client; here the in-memory fake)."""

from __future__ import annotations

import io
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from nvdp.app.labels_output import FileOutput, NodeFeatureOutput, StreamOutput, open_output, write_atomically
from nvdp.config.options import Config
from nvdp.core import nodefeature as nf
from nvdp.errors import ConfigError, LabelError
from nvdp.testing.fake_objects import ApiError, FakeObjects, daemonset_pod

LABELS = {"nvidia.com/gpu.product": "NVIDIA-H200", "nvidia.com/gpu.count": "1", "nvidia.com/mig.capable": "true"}
NS = "gpu-operator"


# ---------------------------------------------------------------------------------------------
# The feature file


def test_file_holds_sorted_key_value_lines_with_mode_0644(tmp_path: Path) -> None:
    path = tmp_path / "features.d" / "gfd"  # the folder is created when missing
    FileOutput(str(path)).write(LABELS)
    assert path.read_text() == (
        "nvidia.com/gpu.count=1\nnvidia.com/gpu.product=NVIDIA-H200\nnvidia.com/mig.capable=true\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["gfd"]  # no temporary file left


def test_a_rewrite_replaces_the_file_in_one_step(tmp_path: Path) -> None:
    path = tmp_path / "gfd"
    FileOutput(str(path)).write(LABELS)
    before = path.stat().st_ino
    FileOutput(str(path)).write({"nvidia.com/gpu.count": "2"})
    assert path.read_text() == "nvidia.com/gpu.count=2\n"
    assert path.stat().st_ino != before  # a new file renamed over the old one, not rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gfd"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "gfd"
    write_atomically(path, "old=1\n")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        write_atomically(path, "new=1\n")
    assert path.read_text() == "old=1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gfd"]


def test_an_unwritable_folder_is_a_label_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(LabelError, match="cannot write the labels to"):
        FileOutput(str(blocker / "gfd")).write(LABELS)


def test_remove(tmp_path: Path) -> None:
    output = FileOutput(str(tmp_path / "gfd"))
    output.remove()  # nothing there yet: fine
    output.write(LABELS)
    output.remove()
    assert list(tmp_path.iterdir()) == []


def test_stdout() -> None:
    stream = io.StringIO()
    StreamOutput(stream).write({"b": "2", "a": "1"})
    assert stream.getvalue() == "a=1\nb=2\n"


@pytest.mark.parametrize("path", ["", "-"])
def test_an_empty_path_or_dash_is_stdout(path: str) -> None:
    assert isinstance(open_output(Config(use_node_feature_api=False, output_file=path), None, io.StringIO()),
                      StreamOutput)


def test_open_output_choices() -> None:
    assert isinstance(open_output(Config(use_node_feature_api=False), None, io.StringIO()), FileOutput)
    with pytest.raises(ConfigError, match="required flag node-name not set"):
        open_output(Config(), FakeObjects(), io.StringIO())
    with pytest.raises(ConfigError, match="required flag namespace not set"):
        open_output(Config(node_name="n", namespace=""), FakeObjects(), io.StringIO())
    with pytest.raises(ConfigError, match="--use-node-feature-api=false"):
        open_output(Config(node_name="n"), None, io.StringIO())  # no client wired yet
    assert isinstance(open_output(Config(node_name="n"), FakeObjects(), io.StringIO()), NodeFeatureOutput)


# ---------------------------------------------------------------------------------------------
# The NodeFeature object (pure)


def test_node_feature_object() -> None:
    owners = nf.owner_references(daemonset_pod("gfd-x1", "gpu-feature-discovery"))
    obj = nf.node_feature("node-1", NS, LABELS, owners)
    assert obj["apiVersion"] == "nfd.k8s-sigs.io/v1alpha1" and obj["kind"] == "NodeFeature"
    assert obj["metadata"]["name"] == "nvidia-features-for-node-1"
    assert obj["metadata"]["namespace"] == NS
    assert obj["metadata"]["labels"] == {"nfd.node.kubernetes.io/node-name": "node-1"}
    assert obj["spec"] == {"features": {"flags": {}, "attributes": {}, "instances": {}}, "labels": LABELS}
    ds, pod = obj["metadata"]["ownerReferences"]
    assert (ds["kind"], ds["name"], ds["controller"], ds["apiVersion"]) == (
        "DaemonSet", "gpu-feature-discovery", True, "apps/v1")
    assert (pod["kind"], pod["name"], pod["apiVersion"]) == ("Pod", "gfd-x1", "v1")
    assert "ownerReferences" not in nf.node_feature("node-1", NS, LABELS)["metadata"]


def test_owner_references_of_odd_pods() -> None:
    assert nf.owner_references(None) == []
    bare = {"metadata": {"name": "p", "uid": "u"}}  # a pod no controller owns: the pod alone
    assert nf.owner_references(bare) == [{"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": "u"}]


def test_updated_only_when_something_changed() -> None:
    desired = nf.node_feature("node-1", NS, LABELS)
    existing: dict[str, Any] = {**desired, "metadata": {**desired["metadata"], "resourceVersion": "7", "uid": "x"}}
    assert nf.updated(existing, desired) is None
    changed = nf.updated(existing, nf.node_feature("node-1", NS, {**LABELS, "nvidia.com/gpu.count": "2"}))
    assert changed is not None
    assert changed["spec"]["labels"]["nvidia.com/gpu.count"] == "2"
    assert changed["metadata"]["resourceVersion"] == "7"  # kept: the update is conditional on it
    foreign = {**existing, "metadata": {**existing["metadata"], "labels": {"team": "ml"}}}
    fixed = nf.updated(foreign, desired)
    assert fixed is not None and fixed["metadata"]["labels"] == {
        "team": "ml", "nfd.node.kubernetes.io/node-name": "node-1"}


# ---------------------------------------------------------------------------------------------
# The NodeFeature output against the in-memory API


def output(api: FakeObjects, pod: str = "gfd-x1") -> NodeFeatureOutput:
    return NodeFeatureOutput(api, "node-1", NS, pod)


def stored(api: FakeObjects) -> dict[str, Any]:
    (obj,) = api.objects.values()
    return obj


def test_create_then_no_update_when_nothing_changed_then_update() -> None:
    api = FakeObjects()
    api.add_pod(NS, daemonset_pod("gfd-x1", "gpu-feature-discovery"))
    out = output(api)
    out.write(LABELS)
    assert api.writes() == [("create", "nvidia-features-for-node-1")]
    assert stored(api)["spec"]["labels"] == LABELS
    assert [o["kind"] for o in stored(api)["metadata"]["ownerReferences"]] == ["DaemonSet", "Pod"]
    out.write(dict(LABELS))
    assert api.writes() == [("create", "nvidia-features-for-node-1")]  # nothing sent
    version = stored(api)["metadata"]["resourceVersion"]
    out.write({**LABELS, "nvidia.com/gpu.count": "2"})
    assert api.writes()[-1] == ("replace", "nvidia-features-for-node-1")
    assert stored(api)["spec"]["labels"]["nvidia.com/gpu.count"] == "2"
    assert stored(api)["metadata"]["resourceVersion"] != version
    assert out.updates == 2


def test_owner_lookup_failure_is_only_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    api = FakeObjects(fail_pods=True)
    with caplog.at_level(logging.WARNING, "nvdp.gfd"):
        output(api).write(LABELS)
    assert "ownerReferences" not in stored(api)["metadata"]
    assert "owner references" in caplog.text and "forbidden" in caplog.text
    output(FakeObjects(), pod="").write(LABELS)  # no POD_NAME: no owners, no lookup


class StaleReads(FakeObjects):
    """Someone else writes between our read and our update: what we read is one version behind."""

    def get_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                     name: str) -> dict[str, Any] | None:
        found = super().get_namespaced_custom_object(group, version, namespace, plural, name)
        if found is not None:
            found["metadata"]["resourceVersion"] = "0"
        return found


def test_api_failures_propagate() -> None:
    api = StaleReads()
    api.objects[("nfd.k8s-sigs.io", "v1alpha1", NS, "nodefeatures", "nvidia-features-for-node-1")] = {
        "metadata": {"name": "nvidia-features-for-node-1", "resourceVersion": "1", "uid": "u"}, "spec": {}}
    with pytest.raises(ApiError, match="modified"):
        output(api).write(LABELS)
