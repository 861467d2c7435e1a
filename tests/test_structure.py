"""Issue item 10 (structure): small modules with one idea each.

Every module of the package stays within 450 lines and every class within 300,
the limits the project keeps so that a newcomer can read a module in one sitting.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "tfp_glow"
MODULE_LINES = 450
CLASS_LINES = 300


def test_item10_modules_and_classes_stay_within_the_size_limits():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 50  # the package is really there
    too_long = {}
    for path in modules:
        text = path.read_text()
        name = str(path.relative_to(PACKAGE.parent))
        lines = len(text.splitlines())
        if lines > MODULE_LINES:
            too_long[name] = lines
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                if size > CLASS_LINES:
                    too_long[f"{name}:{node.name}"] = size
    assert too_long == {}
