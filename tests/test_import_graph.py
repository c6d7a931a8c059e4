"""The project's import graph, read with ast: no cycles, the layer rules of docs/architecture.md, and no function-level
imports of project modules (a lazy import that dodges a cycle hides it) beyond a short list, each with its reason.

Every import counts, at module level or inside a function (lazy imports of heavy third-party packages, such as torch,
onnxruntime, openvino or tensorrt, are fine; the layer rules still see them)."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "training", "export", "runtime", "service", "bench", "deploy")
ROOT_MODULES = ("convnext_cli", "convnext_common", "convnext_files", "convnext_serve")
TORCH = ("torch", "torchvision", "timm")
# (importer package, imported top-level names it must never import, at any level, and why).
LAYER_RULES = [
    ("service", TORCH + ("model", "training", "export"), "the service is torch-free: it reads the model repository"),
    ("runtime", TORCH + ("model", "training", "export"), "runtime/ is the torch-free layer under export and service"),
    ("runtime", ("service", "bench"), "runtime/ sits below the service and the bench"),
    ("export", ("service",), "export writes the repository through runtime/, never through the service"),
]
# Function-level imports of project modules that stay, each with its reason: {(importer, imported): reason}.
FUNCTION_LEVEL_ALLOWED = {
    ("service.__main__", "service.doctor"): "CLI dispatch: `python -m service doctor`",
    ("service.__main__", "service.app"): "`--help` and settings errors answer without importing FastAPI and uvicorn",
    ("service.__main__", "service.server"): "`--help` and settings errors answer without importing uvicorn",
    ("service.__main__", "service.grpc_server"): "`--help` and settings errors answer without importing grpc",
    ("service.__main__", "service.open_files"): "imported with the server it prepares the start of",
    ("deploy.entrypoint", "model.pretrained"): "the service images run `serve` without torch; only `prepare` needs it",
    ("export.source", "model"): "model/ is torch: `python -m export tensorrt|list` run where there is none (GPU image)",
    ("export.source", "model.pretrained"): "model/ is torch: `python -m export tensorrt|list` run without it",
    ("export.source", "model.timm_pretrained"): "model/ is torch: `python -m export tensorrt|list` run without it",
    ("export.source", "model.flops"): "model/ is torch: `python -m export tensorrt|list` run without it",
    ("bench.__main__", "bench.model_throughput"): "imports torch: only `python -m bench torch` needs it",
    ("bench.__main__", "bench.roadmap"): "imports torch and model/: only `python -m bench roadmap` needs them",
    ("bench.engine_benchmark", "model.flops"): "model/ is torch: only `bench all` counts FLOPs; `python -m bench "
                                               "engine|load` and `serve|cpu|soak --repository` run without torch",
    ("bench.cpu_engines", "model.flops"): "model/ is torch: only the GEMM-rate ceiling counts FLOPs; `python -m bench "
                                          "cpu engines --repository` runs without torch (no ceiling then)",
}
# Areas other work is restructuring now: their function-level project imports are listed, not yet fixed.
BEING_RESTRUCTURED: tuple[str, ...] = ()


@dataclass(frozen=True)
class Import:
    importer: str  # module name, e.g. "service.app"
    imported: str  # the deepest module named, or the top-level name of a third-party package
    line: int
    function_level: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def project_modules() -> dict[str, Path]:
    files = [ROOT / f"{name}.py" for name in ROOT_MODULES]
    files += [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    return {module_name(path): path for path in files}


def is_package(module: str) -> bool:
    return project_modules()[module].name == "__init__.py"


def resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """What an import statement names: project modules (deepest that exists) and third-party top-level names."""
    modules = project_modules()
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = importer if is_package(importer) else importer.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}".strip(".")
        # `from pkg import sub` names the module pkg.sub when there is one, else a name defined in pkg.
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    resolved = []
    for name in names:
        while name not in modules and "." in name:
            name = name.rpartition(".")[0]
        resolved.append(name if name in modules else name.split(".")[0])
    return list(dict.fromkeys(resolved))


@cache
def imports() -> list[Import]:
    found = []
    for module, path in project_modules().items():
        tree = ast.parse(path.read_text(), str(path))
        function_level = {id(node) for function in ast.walk(tree)
                          if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
                          for node in ast.walk(function)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for imported in resolve(module, node):
                    if imported != module:
                        found.append(Import(module, imported, node.lineno, id(node) in function_level))
    return found


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {module: set() for module in project_modules()}
    for item in imports():
        if item.imported in edges:
            edges[item.importer].add(item.imported)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return components


def in_area(module: str, areas: tuple[str, ...]) -> bool:
    return any(module == area or module.startswith(f"{area}.") for area in areas)


def test_the_graph_sees_every_package_and_both_kinds_of_import():
    modules = project_modules()
    assert {"service.app", "runtime.engines.factory", "export.onnx", "model.convnext", "convnext_cli"} <= set(modules)
    assert "deploy.entrypoint" in modules and "runtime.engines" in modules
    kinds = {(item.importer, item.imported): item.function_level for item in imports()}
    assert kinds[("service.app", "runtime.engines.factory")] is False
    assert kinds[("deploy.entrypoint", "model.pretrained")] is True
    assert kinds[("model.factory", "torch")] is False and kinds[("runtime.verify", "onnxruntime")] is True
    assert kinds[("model", "model.checkpoints")] is False  # a relative import (`from .checkpoints import ...`)


def test_no_import_cycles_between_modules():
    assert cycles(graph()) == []


def test_tarjan_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("importer,forbidden,why", LAYER_RULES,
                         ids=[f"{rule[0]}-{rule[1][-1]}" for rule in LAYER_RULES])
def test_layer_rules(importer, forbidden, why):
    broken = [f"{item.importer}:{item.line} imports {item.imported}" for item in imports()
              if in_area(item.importer, (importer,)) and in_area(item.imported, forbidden)]
    assert broken == [], why


def function_level_project_imports() -> list[Import]:
    return [item for item in imports() if item.function_level and item.imported in project_modules()]


def allowed(item: Import) -> bool:
    return (item.importer, item.imported) in FUNCTION_LEVEL_ALLOWED or in_area(item.importer, BEING_RESTRUCTURED)


def test_function_level_imports_of_project_modules_are_only_the_listed_ones():
    unlisted = [f"{item.importer}:{item.line} imports {item.imported} inside a function"
                for item in function_level_project_imports() if not allowed(item)]
    assert unlisted == [], "import at module level, or add it to FUNCTION_LEVEL_ALLOWED with its reason"


def test_the_allow_list_has_no_stale_entries():
    used = {(item.importer, item.imported) for item in function_level_project_imports()}
    assert set(FUNCTION_LEVEL_ALLOWED) <= used
    assert all(reason for reason in FUNCTION_LEVEL_ALLOWED.values())
