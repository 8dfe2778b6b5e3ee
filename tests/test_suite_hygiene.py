"""Rules for the test suite itself, checked on its source.

Every process a test starts runs in a session of its own (`start_new_session=True`): torch elastic's
handlers raise SIGTERM in their whole process group, and a child in pytest's group would take the
pytest process (the whole suite) down with it.
"""

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
STARTERS = {"run", "Popen", "call", "check_call", "check_output"}


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _sets_new_session(scope) -> bool:
    """The scope builds keyword arguments with start_new_session=True for a `**kwargs` splat:
    dict(start_new_session=True, ...), {"start_new_session": True}, kw["start_new_session"] = True
    or kw.setdefault("start_new_session", True)."""
    for node in ast.walk(scope):
        if isinstance(node, ast.keyword) and node.arg == "start_new_session" and _is_true(node.value):
            return True
        if isinstance(node, ast.Dict) and any(
                isinstance(k, ast.Constant) and k.value == "start_new_session" and _is_true(v)
                for k, v in zip(node.keys, node.values)):
            return True
        if isinstance(node, ast.Call) and len(node.args) == 2 and isinstance(node.args[0], ast.Constant) \
                and node.args[0].value == "start_new_session" and _is_true(node.args[1]):
            return True
        if isinstance(node, ast.Assign) and _is_true(node.value) and any(
                isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant)
                and t.slice.value == "start_new_session" for t in node.targets):
            return True
    return False


def _starter_names(tree) -> tuple[set[str], set[str]]:
    """(names the subprocess module goes by, names its process starters were imported as)."""
    modules, functions = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name == "subprocess"}
        elif isinstance(node, ast.ImportFrom) and node.module == "subprocess":
            functions |= {a.asname or a.name for a in node.names if a.name in STARTERS}
    return modules, functions


def violations(source: str, filename: str = "<test>") -> list[str]:
    """`file:line` of every call that starts a process without start_new_session=True."""
    tree = ast.parse(source, filename)
    modules, functions = _starter_names(tree)
    found = []

    def visit(node, scope):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            scope = node
        if isinstance(node, ast.Call):
            f = node.func
            starts = (isinstance(f, ast.Attribute) and f.attr in STARTERS and isinstance(f.value, ast.Name)
                      and f.value.id in modules) or (isinstance(f, ast.Name) and f.id in functions)
            own = any(k.arg == "start_new_session" and _is_true(k.value) for k in node.keywords)
            splat = any(k.arg is None for k in node.keywords) and _sets_new_session(scope)
            if starts and not (own or splat):
                found.append(f"{filename}:{node.lineno}")
        for child in ast.iter_child_nodes(node):
            visit(child, scope)

    visit(tree, tree)
    return found


def test_every_process_a_test_starts_has_its_own_session():
    found = [v for path in sorted(TESTS.glob("*.py")) for v in violations(path.read_text(), path.name)]
    assert found == [], "start these with start_new_session=True: " + ", ".join(found)


@pytest.mark.parametrize("source,flagged", [
    ("import subprocess\nsubprocess.run(['true'])", True),
    ("import subprocess\nsubprocess.run(['true'], start_new_session=False)", True),
    ("import subprocess as sp\nsp.check_output(['true'])", True),
    ("from subprocess import Popen\nPopen(['true'])", True),
    ("import subprocess\ndef f(**kw):\n    return subprocess.run(['true'], **kw)", True),
    ("import subprocess\nsubprocess.run(['true'], start_new_session=True)", False),
    ("from subprocess import check_call as cc\ncc(['true'], start_new_session=True)", False),
    ("import subprocess\ndef f(**kw):\n    kw.setdefault('start_new_session', True)\n"
     "    return subprocess.run(['true'], **kw)", False),
    ("import subprocess\ndef f(cmd):\n    opts = {'start_new_session': True, 'text': True}\n"
     "    return subprocess.Popen(cmd, **opts)", False),
])
def test_the_check_itself(source, flagged):
    assert bool(violations(source)) == flagged
