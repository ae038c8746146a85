"""app.discover_once: the one-shot discovery behind `nvdp devices`."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvdp.app.discovery import discover_once
from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.config.load import load
from nvdp.config.options import Config
from nvdp.errors import NoDevicesFound


class Recorded(SimulatedBackend):
    closed = 0

    def close(self) -> None:
        self.closed += 1
        super().close()


@pytest.mark.parametrize(
    ("profile", "error"),
    [pytest.param("pcie-l40s", None, id="found devices"), pytest.param("empty", NoDevicesFound, id="none found")],
)
def test_the_backend_is_closed_whether_or_not_discovery_works(
    tmp_path: Path, profile: str, error: type[Exception] | None
) -> None:
    (tmp_path / "empty.yaml").write_text("gpus: []\n")
    opened: list[Recorded] = []

    def factory(cfg: Config) -> Recorded:
        opened.append(Recorded(cfg.simulate or ""))
        return opened[-1]

    cfg = load({"simulate": profile if profile != "empty" else str(tmp_path / "empty.yaml")}, {})
    if error is None:
        node, plan = discover_once(cfg, factory)
        assert len(node.gpus) == 4 and plan.tree
    else:
        with pytest.raises(error):
            discover_once(cfg, factory)
    assert [b.closed for b in opened] == [1]
