"""The MPS programs, run as subprocesses: `nvidia-cuda-mps-control` (daemon and client mode),
`nvidia-smi` (a GPU's compute mode) and `mount` (the shared-memory tmpfs).

Each program is configured as a path or a command line (`--mps-control`, `--nvidia-smi`), so
tests and the demo run the simulated ones shipped in `backends/simulated/`. A control command
runs with only `CUDA_MPS_PIPE_DIRECTORY` and `CUDA_MPS_LOG_DIRECTORY` in its environment, as the
official plugin runs it; the program itself is found on this process's PATH first.
OSError and exit statuses become MpsError here, naming the program and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nvdp.core import mps
from nvdp.errors import MpsError

COMMAND_TIMEOUT_S = 10.0
OUTPUT_SHOWN = 300  # characters of a failed program's output kept in the error


def command_line(text: str) -> list[str]:
    """A configured program: split like a shell would, the program resolved on our PATH."""
    argv = shlex.split(text)
    if not argv:
        raise MpsError("no program configured")
    found = shutil.which(argv[0])
    return [found or argv[0], *argv[1:]]


def _tail(output: str) -> str:
    text = " ".join(output.split())
    return text if len(text) <= OUTPUT_SHOWN else "..." + text[-OUTPUT_SHOWN:]


@dataclass(frozen=True)
class Result:
    code: int
    output: str  # stdout and stderr together


async def run(
    argv: Sequence[str], stdin: str = "", env: Mapping[str, str] | None = None, timeout: float = COMMAND_TIMEOUT_S
) -> Result:
    """Run a program to its end. Its output goes through a file, not a pipe: a program that starts
    a daemon (`nvidia-cuda-mps-control -d`) may leave the daemon holding its stdout open."""
    with tempfile.TemporaryFile() as out:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None, start_new_session=True,
            )
        except OSError as exc:
            raise MpsError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
        try:
            async with asyncio.timeout(timeout):
                await proc.communicate(stdin.encode())
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise MpsError(f"{os.path.basename(argv[0])} did not finish within {timeout:g} s") from None
        except BaseException:  # cancelled (the plugin stops, a reload drops the check): leave no child behind
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        out.seek(0)
        output = out.read().decode(errors="replace")
    assert proc.returncode is not None
    return Result(proc.returncode, output)


class MpsControl:
    """`nvidia-cuda-mps-control` for the daemons under one MPS root (`/mps` in the chart's pods)."""

    def __init__(self, command: str, root: str, timeout: float = COMMAND_TIMEOUT_S) -> None:
        self.argv = command_line(command)
        self.root = root
        self.timeout = timeout

    @property
    def program(self) -> str:
        """How errors name the program: `nvidia-cuda-mps-control`, or the simulated one's command line."""
        return " ".join([os.path.basename(self.argv[0]), *self.argv[1:]])

    def env(self, resource: str) -> dict[str, str]:
        return mps.daemon_env(self.root, resource)

    async def ask(self, resource: str, lines: Sequence[str]) -> str:
        """Send commands to the resource's daemon (client mode); its answer, or MpsError."""
        result = await run(self.argv, "".join(f"{line}\n" for line in lines), self.env(resource), self.timeout)
        if result.code != 0:
            raise MpsError(f"{self.program} exited with status {result.code}: {_tail(result.output) or 'no output'}")
        return result.output

    async def probe(self, resource: str) -> str | None:
        """The official plugin's readiness check; None when the daemon answers, else why not."""
        try:
            await self.ask(resource, [mps.READINESS_COMMAND])
        except MpsError as exc:
            return str(exc)
        return None

    async def start_daemon(self, resource: str) -> None:
        """`nvidia-cuda-mps-control -d`: it forks the daemon and returns."""
        result = await run([*self.argv, "-d"], "", self.env(resource), self.timeout)
        if result.code != 0:
            raise MpsError(f"{self.program} -d exited with status {result.code}: "
                           f"{_tail(result.output) or 'no output'}")


class ComputeMode:
    """`nvidia-smi -i <uuid> -c <mode>`: DEFAULT, EXCLUSIVE_PROCESS or PROHIBITED."""

    def __init__(self, command: str, timeout: float = COMMAND_TIMEOUT_S) -> None:
        self.argv = command_line(command)
        self.timeout = timeout

    async def set(self, uuid: str, mode: str) -> None:
        result = await run([*self.argv, "-i", uuid, "-c", mode], timeout=self.timeout)
        if result.code != 0:
            raise MpsError(f"nvidia-smi -i {uuid} -c {mode} exited with status {result.code}: "
                           f"{_tail(result.output) or 'no output'}")


def is_mounted(target: str, mountinfo: str) -> bool:
    """Whether /proc/self/mountinfo lists a mount on `target` (field 5 is the mount point)."""
    real = os.path.realpath(target)
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4].replace("\\040", " ") == real:
            return True
    return False


def mount_tmpfs(mount_command: str, target: str, size: str) -> None:
    """`mount -t tmpfs -o rw,nosuid,nodev,noexec,relatime,size=<size> tmpfs <target>`."""
    options = f"rw,nosuid,nodev,noexec,relatime,size={size}"
    argv = [*command_line(mount_command), "-t", "tmpfs", "-o", options, "tmpfs", target]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MpsError(f"cannot mount the MPS shared memory on {target}: {exc}") from exc
    if result.returncode != 0:
        raise MpsError(f"mount of the MPS shared memory on {target} failed with status {result.returncode}: "
                       f"{_tail(result.stdout + result.stderr) or 'no output'}")
