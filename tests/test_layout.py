"""The package's layering (docs/architecture.md): the import graph of ``crm_jax`` has no cycle,
counting imports inside functions; no library module imports a command (``crm_jax.cli``); every
console script points into ``crm_jax.cli``; an import inside a function is an optional or heavy
dependency and says why in a comment. Built with ``ast``: nothing is imported."""

import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "crm_jax")


def _modules(root=PACKAGE):
  """``{module name: path}`` of every ``.py`` file under ``root``."""
  out = {}
  for folder, _, files in os.walk(root):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(folder, f)
        name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
  return out


def _imports(path, module, modules):
  """``[(target module, line, inside a function)]`` of every import of a module in
  ``modules`` (``from a import b`` counts ``a.b`` when that is a module, else ``a``)."""
  tree = ast.parse(open(path).read(), path)
  found = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
      if isinstance(child, ast.Import):
        names = [a.name for a in child.names]
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:
          parts = module.split(".")
          is_package = path.endswith("__init__.py")
          parts = parts[:len(parts) - child.level + (1 if is_package else 0)]
          base = ".".join(parts + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                 for a in child.names]
      else:
        visit(child, inside)
        continue
      for n in names:
        found.append((n, child.lineno, in_function))
  visit(tree, False)
  return found


def _graph():
  modules = _modules()
  return modules, {m: _imports(p, m, modules) for m, p in modules.items()}


def find_cycle(edges):
  """One cycle of the directed graph ``{node: [node]}`` as a list of nodes, or None."""
  state = {}

  def walk(node, stack):
    state[node] = 1
    stack.append(node)
    for nxt in edges.get(node, ()):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = walk(nxt, stack)
        if cycle:
          return cycle
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(edges):
    if node not in state:
      cycle = walk(node, [])
      if cycle:
        return cycle
  return None


def test_find_cycle_finds_one():
  assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": ["b", "c"], "b": ["c"], "c": []}) is None


def test_the_import_graph_has_no_cycle():
  modules, imports = _graph()
  edges = {m: sorted({t for t, _, _ in found if t in modules and t != m})
           for m, found in imports.items()}
  assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_no_library_module_imports_a_command():
  _, imports = _graph()
  bad = [f"{m}:{line} imports {t}" for m, found in imports.items() if not m.startswith("crm_jax.cli")
         for t, line, _ in found if t == "crm_jax.cli" or t.startswith("crm_jax.cli.")]
  assert not bad, bad


def test_every_console_script_points_into_cli():
  text = open(os.path.join(REPO, "pyproject.toml")).read()
  section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
  scripts = dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', section, re.M))
  assert set(scripts) >= {"crm-refine", "crm-evaluate", "crm-train", "crm-convert"}
  modules = _modules()
  for name, target in scripts.items():
    module, _, func = target.partition(":")
    assert module.startswith("crm_jax.cli.") and module in modules, (name, target)
    tree = ast.parse(open(modules[module]).read())
    assert func in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, (name, target)


def test_imports_inside_functions_say_why():
  """An import inside a function is of a heavy or optional dependency, with a comment on its
  line or above its group of imports saying so (everything else is imported at the top of the module)."""
  modules = _modules()
  missing = []
  for m, path in modules.items():
    lines = open(path).read().splitlines()
    tree = ast.parse("\n".join(lines))
    for node in ast.walk(tree):
      if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for inner in ast.walk(node):
        if isinstance(inner, (ast.Import, ast.ImportFrom)):
          here = lines[inner.lineno - 1]
          k = inner.lineno - 2  # the first line above that is not an import of the same group
          while k >= 0 and lines[k].strip().startswith(("import ", "from ")):
            k -= 1
          above = lines[k].strip() if k >= 0 else ""
          if "#" not in here and not above.startswith("#"):
            missing.append(f"{os.path.relpath(path, REPO)}:{inner.lineno}: {here.strip()}")
  assert not missing, missing
