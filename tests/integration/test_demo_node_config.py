"""`nvdp demo --node-config` runs the whole story and says what the kubelet saw."""

from __future__ import annotations

from nvdp.tools.demo_nodeconfig import run_node_config_demo


async def test_the_node_config_demo() -> None:
    lines: list[str] = []
    await run_node_config_demo(lines.append)
    text = "\n".join(lines)
    assert "signal: not running" in text  # the label set before the plugin runs
    assert "kubelet sees 16 x nvidia.com/gpu" in text and "kubelet sees 8 x nvidia.com/gpu on the same stream" in text
    assert "Warning UnknownConfig" in text and 'nvdp_config_manager_label_unknown{value="no-such-config"} 1.0' in text
    assert "API server back" in text
    assert "1 registration" in text and "(never 0)" in text and "SIGHUPs sent: 3; plugin reloads: 3" in text
    assert lines[-1] == "== demo done"
