"""The shape of the code, checked: module-level imports form no cycle and go one way, worker
code never imports the development tooling, and the SDK installs without the worker."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("classify_app", "agents", "models", "tables")
DEV = "classify_app.dev"
# The bottom layer: what every other layer may import, importing nothing of the project's but
# itself (the words, the wire records and the embedding's wire form, the settings).
CONTRACT = {
    "classify_app.vocabulary",
    "classify_app.vectors",
    "classify_app.identity",
    "classify_app.records",
    "classify_app.settings",
}
SDK_THIRD_PARTY = {"aiohttp"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


MODULES = project_modules()


def module_level_imports(path: Path) -> Iterator[str]:
    """Every module a module imports when it is imported (not inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
        for node in body:
            yield node
            if isinstance(node, ast.If | ast.Try):
                yield from statements(node.body)
                yield from statements(node.orelse)
                for handler in getattr(node, "handlers", []):
                    yield from statements(handler.body)

    for node in statements(ast.parse(path.read_text()).body):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            yield base
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    yield f"{base}.{alias.name}"


def graph() -> dict[str, set[str]]:
    return {
        name: {imported for imported in module_level_imports(path) if imported in MODULES}
        for name, path in MODULES.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges[node]:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read_from_the_real_tree() -> None:
    edges = graph()
    assert "classify_app.application" in edges["classify_app.topics"]
    assert "models.batching" in edges["classify_app.worker"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_level_import_cycle() -> None:
    assert cycles(graph()) == []


def allowed(importer: str, imported: str) -> bool:
    """The layering rule: which project modules a module may import at module level."""
    if importer in CONTRACT:
        return imported in CONTRACT or imported == "classify_app"
    if importer.startswith("models"):
        return imported.startswith("models") or imported in {
            "classify_app.vocabulary",
            "classify_app.vectors",
            "classify_app",
        }
    if importer.startswith("tables") and importer != "tables.results":
        return (imported.startswith("tables") and imported != "tables.results") or imported in {
            *CONTRACT,
            "classify_app",
        }
    if importer.startswith("classify_app.sdk"):
        return imported.startswith("classify_app.sdk") or imported in {
            "classify_app",
            "classify_app.vocabulary",
            "classify_app.identity",
        }
    if not importer.startswith(DEV):
        return not imported.startswith(DEV)
    return True


def test_imports_go_one_way() -> None:
    wrong = sorted(
        f"{importer} -> {imported}"
        for importer, targets in graph().items()
        for imported in targets
        if not allowed(importer, imported)
    )
    assert wrong == []


def test_the_sdk_imports_no_worker_dependency() -> None:
    sdk = [name for name in MODULES if name.startswith("classify_app.sdk")]
    reached = set(sdk) | {"classify_app", "classify_app.vocabulary", "classify_app.identity"}
    third_party = {
        imported.split(".")[0]
        for name in reached
        for imported in module_level_imports(MODULES[name])
        if imported.split(".")[0] not in PACKAGES
    }
    assert third_party - set(sys.stdlib_module_names) - {"__future__"} == SDK_THIRD_PARTY


def test_a_worker_never_imports_the_development_tooling() -> None:
    # What Faust's autodiscovery imports when a worker starts, in a fresh interpreter.
    script = (
        "import sys\n"
        "from classify_app.application import app\n"
        "app.finalize(); app.discover()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{PACKAGES!r}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "CLASSIFY_MONGO_URI": ""},
    )
    imported = json.loads(done.stdout.strip().replace("'", '"'))
    assert "agents.download" in imported and "classify_app.web.api" in imported
    assert [name for name in imported if name.startswith(DEV)] == []


def test_worker_code_does_not_use_asyncio_wait_for() -> None:
    # On Python 3.11 `asyncio.wait_for` swallows a cancellation that comes as its future
    # completes: a rebalance once waited forever for the store writer. `asyncio.timeout`.
    calls = [
        f"{module}:{node.lineno}"
        for module, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute)
        and node.attr == "wait_for"
        and isinstance(node.value, ast.Name)
        and node.value.id == "asyncio"
    ]
    assert calls == []


@pytest.mark.parametrize("extra", ["", "[kafka]"])
def test_the_sdk_installs_without_torch_or_faust(extra: str, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--no-build-isolation",
            "--quiet",
            "--report",
            str(report),
            f"{ROOT}{extra}",
        ],
        check=True,
        capture_output=True,
    )
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "aiohttp" in names
    assert ("aiokafka" in names) == (extra == "[kafka]")
    heavy = {"torch", "torchvision", "faust-streaming", "numpy", "pillow", "rocksdict", "pymongo"}
    assert names & heavy == set()


def test_the_image_leaves_the_development_tooling_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "classify_app/dev" in ignored
    assert 'pip install ".[worker]"' in (ROOT / "Dockerfile").read_text()
