"""The package's import graph, read from the source with `ast` (nothing is imported).

- no cycle among the modules of `cgrseg_jax/` (a package's `__init__` counts as
  the package; `from pkg import sub` is an edge to the submodule);
- `models/` imports nothing of the package outside `models/` but `errors`
  (and its families' PyTorch references, lazily);
- imports inside functions only for the optional heavy dependencies, each
  with a comment on its line.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / 'cgrseg_jax'
# What may be imported inside a function: the optional extras and their heavy
# packages (torch, TFDS, SciPy for the .mat converters, Pillow for Cityscapes).
# the `export` extra's converters and runtimes are optional too (cgrseg_jax/exporter.py)
LAZY_ALLOWED = (
  'torch',
  'tensorflow_datasets',
  'scipy',
  'PIL',
  'cgrseg_jax.torch_reference',
  'jax2onnx',
  'litert_converter',
  'onnxruntime',
  'ai_edge_litert',
)


def _module_name(path: Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _modules() -> dict[str, Path]:
  return {_module_name(p): p for p in PACKAGE.rglob('*.py')}


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
  if node.level == 0:
    return node.module or ''
  base = module.split('.') if is_package else module.split('.')[:-1]
  base = base[: len(base) - (node.level - 1)]
  return '.'.join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, modules: dict) -> list[tuple[str, int, bool, str]]:
  """(imported project module, line, inside a function, the source line) per import."""
  tree = ast.parse(path.read_text())
  lines = path.read_text().splitlines()
  is_package = path.name == '__init__.py'
  found = []

  def visit(node, in_function: bool):
    for child in ast.iter_child_nodes(node):
      inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        for alias in child.names:
          found.append((alias.name, child.lineno, in_function, lines[child.lineno - 1]))
      elif isinstance(child, ast.ImportFrom):
        target = _resolve(module, child, is_package)
        for alias in child.names:
          sub = f'{target}.{alias.name}'
          found.append((sub if sub in modules else target, child.lineno, in_function, lines[child.lineno - 1]))
      visit(child, inner)

  visit(tree, False)
  return found


def _graph() -> dict[str, set[str]]:
  """Module -> the project modules it imports, at module level or inside functions."""
  modules = _modules()
  graph = {m: set() for m in modules}
  for m, path in modules.items():
    for target, _, _, _ in _imports(m, path, modules):
      if target in modules and target != m:
        graph[m].add(target)
  return graph


def _find_cycle(graph: dict[str, set[str]]):
  state: dict[str, int] = {}
  stack: list[str] = []

  def dfs(node):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state:
        cycle = dfs(nxt)
        if cycle:
          return cycle
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = dfs(node)
      if cycle:
        return cycle
  return None


def test_the_package_import_graph_has_no_cycle():
  graph = _graph()
  assert len(graph) > 30  # the walk found the package
  assert _find_cycle(graph) is None, ' -> '.join(_find_cycle(graph))


def test_a_cycle_is_found_when_there_is_one():
  # The checker itself: a planted cycle and a clean chain.
  assert _find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None


def test_models_import_only_downward():
  # utilities below the models: errors, the target platform; the references they are checked against
  allowed = {
    'cgrseg_jax.errors',
    'cgrseg_jax.platforms',
    'cgrseg_jax.torch_reference.cgrseg',
    'cgrseg_jax.torch_reference.csfcn',
  }
  bad = {
    m: sorted(
      t for t in targets if t.startswith('cgrseg_jax') and not t.startswith('cgrseg_jax.models') and t not in allowed
    )
    for m, targets in _graph().items()
    if m.startswith('cgrseg_jax.models')
  }
  assert not {m: t for m, t in bad.items() if t}


def test_function_level_imports_are_only_for_optional_heavy_dependencies_and_commented():
  modules = _modules()
  offenders = []
  for m, path in modules.items():
    for target, line, in_function, text in _imports(m, path, modules):
      if not in_function:
        continue
      if not target.startswith(LAZY_ALLOWED) or '#' not in text:
        offenders.append(f'{path.relative_to(PACKAGE.parent)}:{line}: {text.strip()}')
  assert not offenders, '\n'.join(offenders)
