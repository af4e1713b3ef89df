"""The core reads in one order: each file imports only files before it (README "The core in
code"), so a newcomer can read them top to bottom. config.py (the settings) may be imported by
any of them."""
import ast
import os

from helpers import ROOT

CORE = ["layout", "attention", "logprobs", "model", "losses", "talk", "rollout", "learn"]
ANYWHERE = {"config"}


def qstar_imports(name: str) -> set[str]:
    """qstar_ds modules that qstar_ds/<name>.py imports anywhere in it (also inside functions)."""
    tree = ast.parse(open(os.path.join(ROOT, "qstar_ds", f"{name}.py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(a.name for a in node.names)
            elif node.module and node.module.startswith("qstar_ds."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("qstar_ds."))
    return found


def test_core_files_import_only_files_before_them():
    for i, name in enumerate(CORE):
        later_or_outside = qstar_imports(name) - set(CORE[:i]) - ANYWHERE
        assert not later_or_outside, f"qstar_ds/{name}.py imports {sorted(later_or_outside)}: not before it"


def test_the_readme_module_table_lists_the_core_in_this_order():
    readme = open(os.path.join(ROOT, "README.md")).read()
    rows = [ln for ln in readme.splitlines() if ln.startswith("| ") and "`qstar_ds/" in ln]
    listed = [ln.split("`qstar_ds/")[1].split(".py")[0] for ln in rows]
    core_rows = [m for m in listed if m in CORE]
    assert core_rows == CORE, core_rows
