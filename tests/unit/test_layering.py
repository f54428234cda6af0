"""The layering of nfsreset/, read from the source: no import cycles, a pure core,
and every import pointing down the layers the tree is made of.

The graph is built with ast from every `import` / `from ... import` in
nfsreset/, at module level AND inside functions: a function-level import is
still a dependency (it runs on the first call) and the lazy imports that keep
the hooks' start-up short must not hide a cycle. Left out, and why:
- imports under `if TYPE_CHECKING:` (never executed);
- importlib.import_module() with a computed name (the lab's remedy plug-ins:
  nothing in nfsreset imports the plug-ins by name);
- the implicit import of a parent package's __init__.py (each is a docstring
  and constants; test_package_inits_import_nothing_of_nfsreset holds that).

The layers, bottom up (LAYERS): core/ (pure decisions) - kernel/ (one module per
kernel interface) and state/ (client lists on disk and in attrd) - flows/ (the
BPF flow table) - adapters.py - engine.py - daemon/ and lab/ - cli/. A module
imports its own package or packages of lower layers, never a sibling of its own
layer nor anything above: the tree tells kernel -> table -> plan -> actions.

The pure core (every module in nfsreset/core/) is plain Python over plain data:
it imports only itself and the standard library, never a kernel adapter, and
none of the modules through which Python reaches the kernel (socket, ctypes,
fcntl, ...) nor bcc, nftables or pyroute2. model.py uses socket.inet_pton/inet_ntop, which only convert text
(no socket, no syscall): those names, and only those, are allowed.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2] / "nfsreset"

# package (or top-level module) below nfsreset -> its layer; bottom = 0
LAYERS = {"": 0, "bpf": 0, "core": 0,
          "kernel": 1, "state": 1,
          "flows": 2,
          "adapters": 3,
          "engine": 4,
          "daemon": 5, "lab": 5,
          "cli": 6,
          "__main__": 7}
# the modules through which nfsreset reaches the kernel (named in a core violation)
KERNEL_PACKAGES = ("kernel", "flows")
KERNEL_LIBS = {"bcc", "nftables", "pyroute2", "socket", "ctypes", "fcntl", "subprocess", "select",
               "selectors", "mmap", "signal", "os", "shutil", "threading", "multiprocessing", "asyncio"}
SOCKET_TEXT_ONLY = {"inet_pton", "inet_ntop", "AF_INET", "AF_INET6"}


def package_of(module: str) -> str:
    """nfsreset.kernel.addrs -> kernel, nfsreset.engine -> engine, nfsreset -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def core_modules(root: pathlib.Path) -> tuple[str, ...]:
    return tuple(m for m in sources(root) if package_of(m) == "core" and m != "nfsreset.core")


def layer_violations(root: pathlib.Path, layers=LAYERS) -> list[str]:
    """Imports that go up a layer or sideways into another package of the same layer,
    and modules in a package the layer table does not know."""
    g = graph(root)
    bad = [f"{m}: package {package_of(m)!r} has no layer in LAYERS" for m in g if package_of(m) not in layers]
    for src, dsts in g.items():
        for dst, (line, top) in dsts.items():
            a, b = package_of(src), package_of(dst)
            if a == b or a not in layers or b not in layers:
                continue
            if layers[b] >= layers[a]:
                bad.append(f"{src}:{line} imports {dst} ({a} is layer {layers[a]}, {b} is layer {layers[b]}; "
                           f"{'module level' if top else 'in a function'})")
    return bad


def module_name(root: pathlib.Path, path: pathlib.Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources(root: pathlib.Path) -> dict[str, pathlib.Path]:
    # nfsreset/bpf is a symlink to the C sources (and an __init__ docstring): walked like the rest.
    return {module_name(root, p): p for p in sorted(root.rglob("*.py")) if "__pycache__" not in p.parts}


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:`."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def imports(root: pathlib.Path) -> list[tuple[str, str, str, int, bool]]:
    """(importer, imported, its top-level name, line, at module level) for every import
    in the tree; `imported` is the module when it is one of ours, else the full dotted name."""
    mods = sources(root)
    out = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_only(tree)
        top_level = {id(n) for n in tree.body} | {
            id(n) for stmt in tree.body if isinstance(stmt, (ast.If, ast.Try)) for n in ast.walk(stmt)}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in mods else base)
            for t in targets:
                out.append((name, t, t.split(".")[0], node.lineno, id(node) in top_level))
    return out


def graph(root: pathlib.Path) -> dict[str, dict[str, tuple[int, bool]]]:
    """Our modules -> the modules of ours they import -> (line, module level)."""
    mods = sources(root)
    g: dict[str, dict[str, tuple[int, bool]]] = {m: {} for m in mods}
    for src, dst, _top, line, level in imports(root):
        while dst not in mods and "." in dst:     # `import nfsreset.x.y` of a non-module y
            dst = dst.rpartition(".")[0]
        if dst in mods and dst != src:
            g[src].setdefault(dst, (line, level))
    return g


def cycles(g: dict[str, dict]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def describe(g, comp: list[str]) -> str:
    edges = [f"{a} -> {b} (line {line}, {'module level' if top else 'in a function'})"
             for a in comp for b, (line, top) in sorted(g[a].items()) if b in comp]
    return "; ".join(edges)


def closure(g, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for n in g[m]:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def core_violations(root: pathlib.Path) -> list[str]:
    g = graph(root)
    core = core_modules(root)
    bad = []
    for m in core:
        outside = closure(g, m) - set(core) - {"nfsreset.core"}
        if outside:
            kernel = sorted(o for o in outside if package_of(o) in KERNEL_PACKAGES)
            bad.append(f"{m} reaches {sorted(outside)}" + (f" (kernel: {kernel})" if kernel else ""))
    for src, dst, top, line, _level in imports(root):
        if src in core and top in KERNEL_LIBS and top != "socket":
            bad.append(f"{src}:{line} imports {dst}")
    for m in core:
        path = sources(root)[m]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "socket":
                names = {a.name for a in node.names} - SOCKET_TEXT_ONLY
                if names:
                    bad.append(f"{m}:{node.lineno} imports socket.{sorted(names)}")
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id == "socket" and node.attr not in SOCKET_TEXT_ONLY):
                bad.append(f"{m}:{node.lineno} uses socket.{node.attr}")
    return bad


# -- the project ---------------------------------------------------------------------------------
def test_the_graph_sees_the_project():
    g = graph(ROOT)
    core = core_modules(ROOT)
    assert {"nfsreset.core.plan", "nfsreset.core.model", "nfsreset.core.presence", "nfsreset.core.pace",
            "nfsreset.core.movereport"} <= set(core) and "nfsreset.cli.app" in g
    # known edges, one at module level and one inside a function, so an empty graph cannot pass
    assert g["nfsreset.core.plan"]["nfsreset.core.model"][1] is True
    assert g["nfsreset.cli.common"]["nfsreset.engine"][1] is False


def test_no_import_cycle_in_nfsreset():
    g = graph(ROOT)
    found = cycles(g)
    assert not found, "import cycles: " + " | ".join(describe(g, c) for c in found)


def test_the_core_imports_only_the_core_and_nothing_that_reaches_the_kernel():
    assert core_violations(ROOT) == []


def test_every_import_points_down_the_layers():
    assert layer_violations(ROOT) == []


def test_nfsreset_is_packages_and_the_seam():
    """Nothing flat at the top but the package's own files and the seam (adapters, engine)."""
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "adapters.py", "engine.py"], top


def test_package_inits_import_nothing_of_nfsreset():
    for name, path in sources(ROOT).items():
        if path.name == "__init__.py":
            assert not graph(ROOT)[name], name


# -- the checker itself, on a small tree of its own ----------------------------------------------
def _tree(tmp_path, files: dict[str, str]) -> pathlib.Path:
    root = tmp_path / "nfsreset"
    for rel, text in {"__init__.py": "", **files}.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    root = _tree(tmp_path, {"a.py": "from nfsreset import b\n",
                            "b.py": "def f():\n    from nfsreset.a import x\n",
                            "c.py": "if TYPE_CHECKING:\n    from nfsreset import a\nimport nfsreset.a\n",
                            "lab/__init__.py": "", "lab/m.py": "from . import n\n",
                            "lab/n.py": "from .m import X\n"})
    g = graph(root)
    assert sorted(cycles(g)) == [["nfsreset.a", "nfsreset.b"], ["nfsreset.lab.m", "nfsreset.lab.n"]]
    assert "in a function" in describe(g, ["nfsreset.a", "nfsreset.b"])


def test_a_core_module_reaching_the_kernel_is_found(tmp_path):
    root = _tree(tmp_path, {"core/__init__.py": "", "kernel/__init__.py": "",
                            "core/plan.py": "from nfsreset.core import helper\n",
                            "core/helper.py": "def f():\n    from nfsreset.kernel import sockdiag\n",
                            "kernel/sockdiag.py": "",
                            "core/model.py": "import socket\nsocket.inet_pton\nsocket.socket()\n",
                            "core/presence.py": "def f():\n    import ctypes\n", "core/pace.py": "import time\n"})
    bad = core_violations(root)
    assert any(b.startswith("nfsreset.core.plan reaches") and "kernel: ['nfsreset.kernel.sockdiag']" in b for b in bad), bad
    assert "nfsreset.core.model:3 uses socket.socket" in bad and "nfsreset.core.presence:2 imports ctypes" in bad
    assert any(b.startswith("nfsreset.core.helper reaches ['nfsreset.kernel.sockdiag']") for b in bad), bad
    assert not any("pace" in b or "inet_pton" in b for b in bad), bad


def test_an_import_up_or_sideways_is_found(tmp_path):
    root = _tree(tmp_path, {"core/__init__.py": "", "kernel/__init__.py": "", "state/__init__.py": "",
                            "flows/__init__.py": "", "misc/__init__.py": "",
                            "core/model.py": "",
                            "kernel/addrs.py": "from nfsreset.core import model\nfrom nfsreset.kernel import netns\n",
                            "kernel/netns.py": "def f():\n    from nfsreset.flows import tracker\n",
                            "state/store.py": "from nfsreset.kernel import addrs\n",
                            "flows/tracker.py": "from nfsreset.kernel import netns\n",
                            "engine.py": "from nfsreset.core import model\n",
                            "misc/x.py": ""})
    bad = layer_violations(root)
    assert sorted(bad) == sorted([
        "nfsreset.kernel.netns:2 imports nfsreset.flows.tracker (kernel is layer 1, flows is layer 2; in a function)",
        "nfsreset.state.store:1 imports nfsreset.kernel.addrs (state is layer 1, kernel is layer 1; module level)",
        "nfsreset.misc: package 'misc' has no layer in LAYERS",
        "nfsreset.misc.x: package 'misc' has no layer in LAYERS",
    ]), bad

