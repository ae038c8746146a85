"""The simulated MPS programs wired up for a test or the demo, in one folder.

`SimulatedMps(folder)` names the simulated `nvidia-cuda-mps-control` and `nvidia-smi` (as
command lines running this interpreter) and an MPS root under the folder; `settings()` gives
the Config values that point the plugin and the MPS daemon at them. `kill_daemons()` ends any
simulated control daemon still running under the root (by the pid it wrote), for clean-up.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvdp.backends.simulated import mps_control, nvidia_smi
from nvdp.core import mps


@dataclass(frozen=True)
class SimulatedMps:
    folder: Path

    @property
    def root(self) -> Path:
        """The MPS root: the host's mps.root and the containers' /mps at once (one machine)."""
        return self.folder / "mps"

    @property
    def smi_state(self) -> Path:
        return self.folder / "nvidia-smi.json"

    @property
    def control(self) -> str:
        return f"{shlex.quote(sys.executable)} -m nvdp simulate mps-control"

    @property
    def nvidia_smi(self) -> str:
        return f"{shlex.quote(sys.executable)} -m nvdp simulate nvidia-smi --state {shlex.quote(str(self.smi_state))}"

    def settings(self) -> dict[str, Any]:
        """CLI-style Config values (for `config.load.load`)."""
        return {"mps_root": str(self.root), "mps_dir": str(self.root), "mps_control": self.control,
                "nvidia_smi": self.nvidia_smi}

    def pipe(self, resource: str) -> Path:
        return Path(mps.pipe_dir(str(self.root), resource))

    def log(self, resource: str) -> Path:
        return Path(mps.log_dir(str(self.root), resource))

    def state(self, resource: str) -> dict[str, Any]:
        """What the resource's simulated daemon was told (commands in order, current defaults)."""
        return mps_control.read_state(self.pipe(resource))

    def compute_modes(self) -> dict[str, str]:
        modes: dict[str, str] = nvidia_smi.read_state(self.smi_state)["modes"]
        return modes

    def daemon_pid(self, resource: str) -> int | None:
        try:
            return int((self.pipe(resource) / mps_control.PID).read_text())
        except (OSError, ValueError):
            return None

    def kill_daemons(self) -> list[int]:
        """SIGKILL every simulated daemon under the root (found by its pid file); the pids killed."""
        killed = []
        for pid_file in self.root.rglob(mps_control.PID) if self.root.exists() else ():
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                pid_file.unlink()
        return killed
