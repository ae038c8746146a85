"""A stand-in for the two `nvidia-smi` uses of the MPS daemon, for CPU tests and the demo.

Run as `nvdp simulate nvidia-smi --state FILE ...`: `-i <uuid|index> -c <mode>` sets a GPU's
compute mode (DEFAULT, EXCLUSIVE_PROCESS, PROHIBITED, or 0, 2, 3) and answers as the real one
does; `-i <id> --query-gpu=compute_mode --format=csv,noheader` prints it. The modes live in the
JSON state file (GPU id -> mode), and every call is appended to its "calls" list, in order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

MODES = {"0": "DEFAULT", "2": "EXCLUSIVE_PROCESS", "3": "PROHIBITED"}
# How the real one prints a mode in --query-gpu output.
QUERY_NAMES = {"DEFAULT": "Default", "EXCLUSIVE_PROCESS": "Exclusive_Process", "PROHIBITED": "Prohibited"}


def read_state(path: str | Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads(Path(path).read_text())
    except FileNotFoundError:
        state = {}
    state.setdefault("modes", {})
    state.setdefault("calls", [])
    return state


def main(argv: Sequence[str], state_file: str, stdout: IO[str]) -> int:
    args = list(argv)
    gpu = _value(args, "-i")
    mode = _value(args, "-c")
    state = read_state(state_file)
    state["calls"].append(" ".join(argv))
    try:
        if gpu is None:
            print("Only -i <gpu> -c <mode> and -i <gpu> --query-gpu=compute_mode are simulated", file=stdout)
            return 2
        if mode is not None:
            name = MODES.get(mode, mode.upper())
            if name not in QUERY_NAMES:
                print(f'Invalid combination of input arguments. Please run "nvidia-smi -h" for help. ({mode})',
                      file=stdout)
                return 2
            before = state["modes"].get(gpu, "DEFAULT")
            state["modes"][gpu] = name
            if before == name:
                print(f"Compute mode is already set to {name} for GPU {gpu}.", file=stdout)
            else:
                print(f"Set compute mode to {name} for GPU {gpu}.", file=stdout)
            print("All done.", file=stdout)
            return 0
        if "--query-gpu=compute_mode" in args:
            print(QUERY_NAMES[state["modes"].get(gpu, "DEFAULT")], file=stdout)
            return 0
        print("Only -c and --query-gpu=compute_mode are simulated", file=stdout)
        return 2
    finally:
        Path(state_file).write_text(json.dumps(state, indent=1))


def _value(args: list[str], flag: str) -> str | None:
    if flag in args:
        at = args.index(flag)
        return args[at + 1] if at + 1 < len(args) else None
    return None
