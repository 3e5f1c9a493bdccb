"""The package's layout is its architecture: subpackages in one dependency order.

Every import in `tlresearch/` is read from the source, those inside functions included,
and resolved to the module it loads. A module may import its own subpackage and those
below it in `ORDER`; `analysis` and `deploy` share a rank and may not import each other. No
module imports `experiments/` (the command line finds an experiment by name at run time),
and no two modules import each other, directly or around a longer loop.
"""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tlresearch"
# Lowest first; one tuple is one rank.
ORDER = [("core",), ("data",), ("models",), ("methods",), ("training",),
         ("analysis", "deploy"), ("experiment",), ("tools",), ("run",)]
RANK = {name: i for i, names in enumerate(ORDER) for name in names}


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str) -> str | None:
  """The project module an import of `name` loads (a package's `__init__` for a package)."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _imports(module: str) -> list[tuple[str, int]]:
  """(imported name, line) for every import statement of `module`, at any depth."""
  path = MODULES[module]
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  out = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out += [(a.name, node.lineno) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      # `from pkg import mod` loads pkg.mod when it is a module, else a name of pkg.
      out += [(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base, node.lineno)
              for a in node.names]
  return out


def _graph() -> dict[str, set[str]]:
  graph = {}
  for module in MODULES:
    targets = {_resolve(name) for name, _ in _imports(module)}
    graph[module] = {t for t in targets if t is not None and t != module}
  return graph


def _layer(module: str) -> str | None:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else None  # None: the package's own __init__


def test_every_module_belongs_to_a_layer():
  unplaced = sorted(m for m in MODULES if _layer(m) is not None and _layer(m) not in RANK)
  assert not unplaced, f"modules outside every layer of ORDER: {unplaced}"


def test_no_module_imports_the_experiments():
  hits = [f"{m}:{line}" for m in MODULES for name, line in _imports(m)
          if name == "experiments" or name.startswith("experiments.")]
  assert not hits, f"the library imports experiments/: {hits}"


def test_imports_only_go_down_the_layers():
  upward = []
  for module in MODULES:
    source = _layer(module)
    for name, line in _imports(module):
      target = _resolve(name)
      if source is None or target is None or _layer(target) in (None, source):
        continue
      if RANK[_layer(target)] >= RANK[source]:
        upward.append(f"{module}:{line} imports {target}")
  assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle of `graph` as [a, b, ..., a], or None."""
  colour, stack = {}, []

  def visit(node):
    colour[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if colour.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in colour and (found := visit(nxt)):
        return found
    colour[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in colour and (found := visit(node)):
      return found
  return None


def test_no_import_cycle():
  cycle = _cycle(_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_subpackages_show_a_small_public_surface():
  wide = {}
  for layer in RANK:
    init = PACKAGE / layer / "__init__.py"
    if not init.exists():
      continue
    tree = ast.parse(init.read_text())
    names = [ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
             and any(getattr(t, "id", None) == "__all__" for t in n.targets)]
    if not names or not 3 <= len(names[0]) <= 8:
      wide[layer] = names[0] if names else None
  assert not wide, f"subpackages whose __all__ is missing or not 3-8 names: {wide}"


@pytest.mark.parametrize("module", ["tlresearch.deploy.predict", "tlresearch.deploy.export"])
def test_deploying_needs_neither_tfds_nor_matplotlib(module):
  code = (f"import sys, {module}\n"
          "heavy = [m for m in ('tensorflow_datasets', 'matplotlib', 'tensorflow') "
          "if m in sys.modules]\n"
          "assert not heavy, heavy\n")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-2000:]


def _functions():
  for module, path in MODULES.items():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        yield module, node


def test_no_function_is_longer_than_a_screen():
  long = [f"{m}.{f.name}: {f.end_lineno - f.lineno + 1} lines" for m, f in _functions()
          if f.end_lineno - f.lineno + 1 > 60]
  assert not long, long


def test_config_defaults_live_only_in_the_schema():
  """`cfg.get(key, default)` would be a second copy of a default the schema
  (tlresearch.core.schema) already gives; configs are read by attribute."""
  hits = []
  for module, path in MODULES.items():
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "get" and len(node.args) == 2
          and any(w in ast.unparse(node.func.value).lower() for w in ("cfg", "config", "kwargs"))):
        hits.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
  assert not hits, hits
