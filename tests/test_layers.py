"""The Python layers import each other in one direction (issue 27, docs/architecture.md): no
import cycles, lazy imports inside functions included (names imported for annotations only, under
``if TYPE_CHECKING:``, are not imports at run time), and no layer imports one above it."""
from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "llamagen"


def _is_module(name: str) -> bool:
    p = PKG.parent.joinpath(*name.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists() or name == "llamagen._core"


def _targets(module: str, names) -> set:
    subs = [f"{module}.{n}" for n in names]
    mods = {s for s in subs if _is_module(s)}
    return mods if len(mods) == len(subs) else mods | {module}


def import_graph() -> dict:
    """module -> the llamagen modules it imports anywhere in its source (the compiled core's
    .pyx/.pxi sources count as llamagen._core)."""
    graph: dict = {}
    for path in PKG.rglob("*"):
        rel = path.relative_to(PKG.parent)
        if path.suffix == ".py":
            name = ".".join(rel.with_suffix("").parts)
            name = name[:-len(".__init__")] if name.endswith(".__init__") else name
            deps = set()
            tree = ast.parse(path.read_text())
            # names for annotations only (``if TYPE_CHECKING:``) are not imported at run time
            typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                           and getattr(block.test, "id", None) == "TYPE_CHECKING"
                           for n in ast.walk(block)}
            for node in ast.walk(tree):
                if id(node) in typing_only:
                    continue
                if isinstance(node, ast.ImportFrom) and node.level == 0 and \
                        (node.module or "").startswith("llamagen"):
                    deps |= _targets(node.module, [a.name for a in node.names])
                elif isinstance(node, ast.Import):
                    deps |= {a.name for a in node.names if a.name.startswith("llamagen")}
        elif path.suffix in (".pyx", ".pxi"):
            name = "llamagen._core"
            deps = set()
            for module, names in re.findall(r"^\s*from (llamagen[\w.]*) import ([^\n(]+)",
                                            path.read_text(), re.M):
                parts = [n.strip().split(" as ")[0] for n in names.rstrip("\\").split(",")]
                deps |= _targets(module, [p for p in parts if p])
        else:
            continue
        graph.setdefault(name, set()).update(d for d in deps if d != name)
    return graph


def _cycle(graph):
    state: dict = {}
    for start in graph:
        if start in state:
            continue
        stack = [(start, iter(sorted(graph.get(start, ()))))]
        path = [start]
        state[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                path.pop()
                state[node] = 2
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state and nxt in graph:
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
    return None


def test_the_python_layers_have_no_import_cycles():
    graph = import_graph()
    # the package itself only gathers names: what imports it is a user, not a layer
    graph = {m: {d for d in deps if d != "llamagen"} for m, deps in graph.items()
             if m != "llamagen"}
    assert "llamagen._core" in graph and "llamagen.server.app" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_no_layer_imports_one_above_it():
    graph = import_graph()
    for m, deps in graph.items():
        if not m.startswith(("llamagen.server", "llamagen.cli", "llamagen.__main__")):
            assert not {d for d in deps if d.startswith(("llamagen.server", "llamagen.cli"))}, m
        if m.startswith("llamagen.server"):
            assert "llamagen.cli" not in deps, m
    # routers take their dependencies from deps.py, not from the app that includes them
    for router in ("openai", "anthropic", "embeddings"):
        assert "llamagen.server.app" not in graph[f"llamagen.server.{router}"]


def test_the_cycle_check_can_fail():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_a_prompt_too_long_is_the_same_error_on_every_path(tiny_model):
    # issue 27: the engine raised PromptTooLongError, generate / BatchGenerator a plain ValueError
    import llamagen
    from llamagen import BatchGenerator, Context
    long = list(range(3, 3 + 300))
    with Context(tiny_model, n_ctx=256, n_seq_max=2) as ctx:
        for call in (lambda: llamagen.generate(ctx, long, max_new_tokens=1),
                     lambda: BatchGenerator(ctx, n_parallel=2).add(long, max_new_tokens=1)):
            try:
                call()
            except llamagen.PromptTooLongError as e:
                assert e.n_prompt == 300 and e.n_ctx <= 256 and isinstance(e, ValueError)
            else:
                raise AssertionError("accepted")
