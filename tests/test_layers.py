"""The layering rule: imports point one way, none hide in functions, none cycle.

Layers, bottom to top: `delegates` (LiteRT backends) < `smtm_tf.runtime`
(descriptor, policy, memory state, host runtime) < `smtm_tf.fitting` <
`converters` < `smtm_tf.evaluation` < `scripts`. A module may import its own
layer and the ones below. The runtime layer must import without TensorFlow
or Keras.
"""

import ast
import os
import subprocess
import sys

from absl.testing import absltest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("delegates", "smtm_tf", "converters", "scripts")
LAYERS = ("delegates", "smtm_tf.runtime", "smtm_tf.fitting", "converters",
          "smtm_tf.evaluation", "scripts")


def _modules():
    """{dotted module name: path} for every module of the project's packages."""
    out = {}
    for package in PACKAGES:
        for directory, _, files in os.walk(os.path.join(REPO, package)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(directory, f)
                    name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _layer(module: str) -> int | None:
    """Index in LAYERS of the longest prefix naming `module`'s layer (None: the
    `smtm_tf` package itself, whose public names resolve lazily)."""
    best = None
    for i, layer in enumerate(LAYERS):
        if module == layer or module.startswith(layer + "."):
            if best is None or len(layer) > len(LAYERS[best]):
                best = i
    return best


def _own_imports(tree, modules):
    """(node, imported module) for every import of a project module in `tree`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                yield node, full if full in modules else node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield node, alias.name


class LayersTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.modules = _modules()
        cls.trees = {}
        for name, path in cls.modules.items():
            with open(path, encoding="utf-8") as f:
                cls.trees[name] = ast.parse(f.read(), path)

    def test_every_module_has_a_layer(self):
        homeless = [m for m in self.modules if m != "smtm_tf" and _layer(m) is None]
        self.assertEqual(homeless, [])

    def test_no_function_local_imports_of_project_modules(self):
        hidden = []
        for name, tree in self.trees.items():
            top = {id(n) for n in tree.body}
            for node, target in _own_imports(tree, self.modules):
                if id(node) not in top:
                    hidden.append(f"{name}:{node.lineno} imports {target} inside a function")
        self.assertEqual(hidden, [])

    def test_imports_point_down(self):
        upward = []
        for name, tree in self.trees.items():
            if name == "smtm_tf":
                continue
            for node, target in _own_imports(tree, self.modules):
                low = _layer(target)
                if target == "smtm_tf" or (low is not None and low > _layer(name)):
                    upward.append(f"{name}:{node.lineno} ({LAYERS[_layer(name)]}) imports "
                                  f"{target}")
        self.assertEqual(upward, [])

    def test_no_import_cycles(self):
        graph = {name: {t for _, t in _own_imports(tree, self.modules) if t in self.modules}
                 for name, tree in self.trees.items()}
        # A package's __init__ importing its own modules is not a cycle with them.
        state, cycles = {}, []

        def visit(node, path):
            state[node] = "open"
            for nxt in sorted(graph[node]):
                if nxt == node or node.startswith(nxt + ".") and nxt in PACKAGES:
                    continue
                if state.get(nxt) == "open":
                    cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
                elif nxt not in state:
                    visit(nxt, path + [nxt])
            state[node] = "done"

        for name in sorted(graph):
            if name not in state:
                visit(name, [name])
        self.assertEqual(cycles, [])

    def test_no_private_names_across_modules(self):
        leaks = []
        for name, tree in self.trees.items():
            aliases = {}
            for node in tree.body:
                if isinstance(node, ast.ImportFrom) and node.module and (
                        node.module.split(".")[0] in PACKAGES):
                    for alias in node.names:
                        if alias.name.startswith("_"):
                            leaks.append(f"{name} imports {node.module}.{alias.name}")
                        aliases[alias.asname or alias.name] = alias.name
            for node in ast.walk(tree):
                if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                        and not node.attr.startswith("__")
                        and isinstance(node.value, ast.Name) and node.value.id in aliases):
                    leaks.append(f"{name}:{node.lineno} uses {node.value.id}.{node.attr}")
        self.assertEqual(leaks, [])

    def test_the_runtime_imports_without_tensorflow_or_keras(self):
        code = ("import sys\n"
                "import smtm_tf\n"
                "from smtm_tf.runtime import SmtmRuntime\n"
                "from smtm_tf.fitting import streams\n"
                "assert smtm_tf.SmtmRuntime is SmtmRuntime\n"
                "heavy = sorted(m for m in sys.modules\n"
                "               if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras'))\n"
                "print(heavy[:5])\n"
                "sys.exit(1 if heavy else 0)\n")
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                              text=True, timeout=120, check=False)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)


if __name__ == "__main__":
    absltest.main()
