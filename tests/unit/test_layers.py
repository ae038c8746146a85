"""The package's layers, as docs/architecture.md draws them, checked on the code's own imports.

Every `import` and `from ... import` counts, wherever it stands: at the top, inside a function, or
under `if TYPE_CHECKING:`. The graph is read with `ast` (nothing is imported), so a rule broken in a
branch that never runs still fails here.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "nvdp"

# Low to high: a module may import its own folder and any folder of a lower rank, never a higher
# one nor another folder of the same rank. `errors` and the package root are the floor.
RANKS: Mapping[str, int] = {
    "errors": 0,
    "": 0,  # nvdp/__init__.py (__version__)
    "config": 1,
    "unix_sockets": 1,  # nvdp/unix_sockets.py: the binding rules every socket follows (backends/ and kubelet/)
    "core": 2,
    "backends": 3,
    "ops": 4,
    "kubelet": 5,
    "kube": 5,  # the Kubernetes API edge, beside the kubelet edge
    "app": 6,
    "testing": 6,
    "tools": 7,
    "cli": 8,
    "entrypoint": 9,
    "launch": 9,  # the console scripts' entry points (signal handlers before the CLI is imported)
    "__main__": 9,
}
# Third-party modules that only some folders may import.
ONLY: Mapping[str, frozenset[str]] = {
    "pynvml": frozenset({"backends/nvml"}),
    "grpc": frozenset({"kubelet", "testing"}),
    "nvdp.kubelet._proto": frozenset({"kubelet", "testing"}),
    "prometheus_client": frozenset({"ops", "tools"}),  # tools: `nvdp status` parses /metrics
    "h11": frozenset({"ops", "testing"}),  # testing: the fake API server
    "lightkube": frozenset({"kube"}),
    "httpx2": frozenset({"kube"}),
    "inotify_simple": frozenset({"kubelet"}),
}
# The pure core: no servers, threads, sockets or subprocesses.
CORE_FORBIDDEN = frozenset({"asyncio", "threading", "socket", "subprocess"})
# Only the CLI reads the process's argv and environment (launch.py looks for `serve` in argv before
# the CLI is imported; testing/process.py starts children with it; testing/stalled_reader.py is
# such a child's command line).
ENVIRON_READERS = frozenset({"nvdp.cli", "nvdp.launch", "nvdp.testing.process", "nvdp.testing.stalled_reader"})


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    target: str  # imported module, dotted (an nvdp module resolved to the file that exists)
    line: int


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in root.rglob("*.py")}


def generated(name: str) -> bool:
    return name.startswith("nvdp.kubelet._proto")


def _resolve(name: str, known: Mapping[str, Path]) -> str:
    """`nvdp.core.mig.X` -> the longest prefix that is a module of ours."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return name


def imports_of(name: str, path: Path, known: Mapping[str, Path]) -> Iterator[Import]:
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(name, _resolve(alias.name, known), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                # `from nvdp.core import mig` imports the module nvdp.core.mig when it exists.
                yield Import(name, _resolve(f"{base}.{alias.name}" if base else alias.name, known), node.lineno)


def graph(root: Path = PACKAGE) -> list[Import]:
    known = modules(root)
    return [i for name, path in sorted(known.items()) if not generated(name) for i in imports_of(name, path, known)]


def cycles(edges: list[Import]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself)."""
    succ: dict[str, set[str]] = {}
    for e in edges:
        if e.target.startswith("nvdp"):
            succ.setdefault(e.source, set()).add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(succ.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in succ.get(v, ()):
                found.append(sorted(component))

    for v in sorted(succ):
        if v not in index:
            visit(v)
    return found


def folder(module: str) -> str:
    """nvdp.backends.nvml.seam -> 'backends'; nvdp.cli -> 'cli'; nvdp -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def place(module: str) -> str:
    """The path-like place rules in ONLY speak of: 'backends/nvml', 'kubelet', ..."""
    return "/".join(module.split(".")[1:3]) if folder(module) == "backends" else folder(module)


def layer_violations(edges: list[Import]) -> list[str]:
    bad = []
    for e in edges:
        src, dst = folder(e.source), folder(e.target)
        if e.target.startswith("nvdp") and src != dst and RANKS[dst] >= RANKS[src]:
            bad.append(f"{e.source}:{e.line} imports {e.target} ({dst or 'nvdp'} is not below {src})")
        for restricted, allowed in ONLY.items():
            if e.target == restricted or e.target.startswith(restricted + "."):
                where = place(e.source)
                if not any(where == a or where.startswith(a + "/") for a in allowed):
                    bad.append(f"{e.source}:{e.line} imports {e.target} (only {', '.join(sorted(allowed))} may)")
        if src == "core" and e.target.split(".")[0] in CORE_FORBIDDEN:
            bad.append(f"{e.source}:{e.line} imports {e.target} (the core is pure)")
    return bad


def environ_readers(known: Mapping[str, Path]) -> list[str]:
    found = []
    for name, path in known.items():
        if generated(name):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "argv", "getenv"):
                base = node.value
                if isinstance(base, ast.Name) and base.id in ("os", "sys") and name not in ENVIRON_READERS:
                    found.append(f"{name}:{node.lineno} reads {base.id}.{node.attr}")
    return found


def test_the_package_has_no_import_cycle() -> None:
    assert cycles(graph()) == []


def test_every_import_respects_the_layers() -> None:
    assert layer_violations(graph()) == []


def test_only_the_cli_reads_argv_and_environ() -> None:
    assert environ_readers(modules()) == []


# Logger names operators filter on (docs/architecture.md "Logger names"): the names of the flat
# package's modules, kept when the modules moved into folders.
LOGGER_NAMES = frozenset({
    "nvdp", "nvdp.app", "nvdp.manager", "nvdp.server", "nvdp.kubelet", "nvdp.nvml", "nvdp.healthwatch",
    "nvdp.configfile", "nvdp.simcontrol", "nvdp.web", "nvdp.config",
    "nvdp.gfd",  # new with GPU feature discovery (app/labeller.py)
    "nvdp.cluster",  # new with what the cluster sees (ops/cluster.py)
    "nvdp.cdi",  # new with the CDI spec writer (app/cdi.py)
    "nvdp.mps", "nvdp.mpsdaemon",  # new with MPS (app/mps.py, app/mps_daemon.py)
    "nvdp.kube", "nvdp.configmanager",  # new with the config-manager (kube/, app/config_manager.py)
})


def logger_names(known: Mapping[str, Path]) -> dict[str, str]:
    """module -> the literal name it passes to logging.getLogger (`__name__` would drift with moves)."""
    found = {}
    for name, path in known.items():
        if generated(name):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "getLogger"
                    and node.args):
                arg = node.args[0]
                found[name] = str(arg.value) if isinstance(arg, ast.Constant) else ast.unparse(arg)
    return found


def test_logger_names_stay_as_documented() -> None:
    names = logger_names(modules())
    assert set(names.values()) - {"grpc"} == LOGGER_NAMES, names  # "grpc": ops/logs.py quiets grpc's own logger


def test_every_folder_has_a_rank() -> None:
    assert {folder(m) for m in modules()} <= set(RANKS)


# --- the checks themselves can fail -----------------------------------------------------------


def _plant(tmp_path: Path, files: Mapping[str, str]) -> Path:
    root = tmp_path / "nvdp"
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param(
            {"core/__init__.py": "", "core/a.py": "def f():\n    from nvdp.core import b\n",
             "core/b.py": "from nvdp.core.a import f\n"},
            [["nvdp.core.a", "nvdp.core.b"]],
            id="cycle through an import inside a function",
        ),
        pytest.param(
            {"ops/__init__.py": "", "app/__init__.py": "",
             "ops/m.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from nvdp.app.p import P\n",
             "app/p.py": "from nvdp.ops import m\nclass P: ...\n"},
            [["nvdp.app.p", "nvdp.ops.m"]],
            id="cycle under TYPE_CHECKING",
        ),
        pytest.param({"core/__init__.py": "", "core/a.py": "import os\n"}, [], id="no cycle"),
    ],
)
def test_a_planted_cycle_is_found(tmp_path: Path, files: Mapping[str, str], expected: list[list[str]]) -> None:
    assert cycles(graph(_plant(tmp_path, files))) == expected


@pytest.mark.parametrize(
    ("files", "fragment"),
    [
        pytest.param({"core/__init__.py": "", "core/a.py": "from nvdp.kubelet import server\n",
                      "kubelet/__init__.py": "", "kubelet/server.py": ""}, "is not below core", id="core -> kubelet"),
        pytest.param({"core/__init__.py": "", "core/a.py": "import grpc\n"}, "only kubelet, testing may",
                     id="grpc in the core"),
        pytest.param({"backends/__init__.py": "", "backends/sim.py": "import pynvml\n"}, "only backends/nvml may",
                     id="pynvml outside the nvml backend"),
        pytest.param({"core/__init__.py": "", "core/a.py": "import asyncio\n"}, "the core is pure",
                     id="asyncio in the core"),
        pytest.param({"ops/__init__.py": "", "kubelet/__init__.py": "", "ops/m.py": "import nvdp.kubelet.manager\n",
                      "kubelet/manager.py": ""}, "is not below ops", id="ops reaching into kubelet"),
    ],
)
def test_a_planted_layer_break_is_found(tmp_path: Path, files: Mapping[str, str], fragment: str) -> None:
    violations = layer_violations(graph(_plant(tmp_path, files)))
    assert len(violations) == 1 and fragment in violations[0]


def test_a_planted_environ_read_is_found(tmp_path: Path) -> None:
    root = _plant(tmp_path, {"core/__init__.py": "", "core/a.py": "import os\nX = os.environ.get('A')\n"})
    assert environ_readers(modules(root)) == ["nvdp.core.a:2 reads os.environ"]
