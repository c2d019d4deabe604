"""The lesson contract (``labkit/lessons/__init__.py``), checked for every lesson module.

These checks read code and notebooks; they start no process, so they run in
``make quick``. A lesson that breaks the contract fails here with a message
that says which rule and how to fix it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
from pathlib import Path
from types import FunctionType, ModuleType

import pytest

from labkit.cluster import LocalCluster
from labkit.lessons import module_names
from labkit.measure import claims

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
LESSON_TESTS = ROOT / "tests" / "lessons"
MODULES = module_names()
ALLOWED_RETURNS = {"Measurement", "Comparison", "None"}


def topic(module: ModuleType) -> str:
    return module.__name__.rsplit(".", 1)[1]


@pytest.fixture(params=MODULES, ids=[m.rsplit(".", 1)[1] for m in MODULES])
def lesson(request: pytest.FixtureRequest) -> ModuleType:
    return importlib.import_module(request.param)


def notebook_code(module: ModuleType) -> str:
    nb = json.loads((NOTEBOOKS / module.NOTEBOOK).read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def test_every_lesson_notebook_has_a_module():
    named = {importlib.import_module(m).__dict__.get("NOTEBOOK") for m in MODULES}
    lessons = {p.name for p in NOTEBOOKS.glob("[0-8][0-9]_*.ipynb")}
    assert lessons <= named, f"notebooks without a lesson module naming them (NOTEBOOK = ...): {lessons - named}"


def test_names_its_notebook(lesson: ModuleType):
    name = getattr(lesson, "NOTEBOOK", None)
    assert isinstance(name, str), f"{lesson.__name__}: set NOTEBOOK = 'NN_topic.ipynb'"
    assert (NOTEBOOKS / name).exists(), f"{lesson.__name__}: NOTEBOOK {name!r} is not in notebooks/"


def test_cluster_is_valid_and_is_what_the_notebook_starts(lesson: ModuleType):
    cfg = getattr(lesson, "CLUSTER", None)
    assert isinstance(cfg, dict), f"{lesson.__name__}: set CLUSTER = {{...LocalCluster keyword arguments}}"
    known = set(inspect.signature(LocalCluster.__init__).parameters) - {"self"}
    assert set(cfg) <= known, f"{lesson.__name__}: CLUSTER has unknown keys {set(cfg) - known}"
    LocalCluster.check_options(**cfg)
    code = notebook_code(lesson)
    short = topic(lesson)
    starts = re.search(rf"LocalCluster\(\*\*{short}\.(CLUSTER\)|cluster_config\()", code)
    assert starts, (f"{lesson.NOTEBOOK}: start the cluster with LocalCluster(**{short}.CLUSTER) "
                    f"(or **{short}.cluster_config(...))")
    if "cluster_config" in vars(lesson):
        assert lesson.cluster_config() == cfg, f"{lesson.__name__}: CLUSTER must equal cluster_config()"


def test_workshop_parameters_are_notebook_parameters(lesson: ModuleType):
    from papermill.inspection import inspect_notebook

    workshop = getattr(lesson, "WORKSHOP", None)
    assert isinstance(workshop, dict) and workshop, (
        f"{lesson.__name__}: set WORKSHOP = {{...}}: notebook parameters a workshop host would pick")
    params = inspect_notebook(str(NOTEBOOKS / lesson.NOTEBOOK))
    unknown = set(workshop) - set(params)
    assert not unknown, f"{lesson.__name__}: WORKSHOP names {unknown}, which the parameters cell does not define"
    same = [k for k, v in workshop.items() if repr(v) == params[k]["default"]]
    assert len(same) < len(workshop), f"{lesson.__name__}: WORKSHOP repeats the defaults"


def _public_functions(module: ModuleType):
    for name, fn in vars(module).items():
        # type(), not inspect.isfunction(): a task's proxy resolves against the current app when asked
        # its __class__, and raises NotRegistered once a closed cluster's app is the current one
        if type(fn) is FunctionType and fn.__module__ == module.__name__ and not name.startswith("_"):
            yield name, fn


def _return_names(annotation: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", annotation)) - {"list", "dict", "tuple", "str", "int"}


def test_experiments_take_the_cluster_and_return_measurements(lesson: ModuleType):
    problems = []
    for name, fn in _public_functions(lesson):
        params = list(inspect.signature(fn).parameters.values())
        if "cluster" not in [p.name for p in params]:
            continue
        where = f"{lesson.__name__}.{name}"
        if params[0].name != "cluster":
            problems.append(f"{where}: `cluster` must be the first parameter")
        if params[0].annotation not in ("ClusterLike", "LocalCluster"):
            problems.append(f"{where}: annotate `cluster: ClusterLike` (no faults) or `cluster: LocalCluster`")
        missing = [p.name for p in params[1:] if p.default is inspect.Parameter.empty
                   and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if missing:
            problems.append(f"{where}: parameters {missing} need defaults (experiments run as fn(cluster))")
        ret = fn.__annotations__.get("return")
        if ret is None or not _return_names(str(ret)) <= ALLOWED_RETURNS:
            problems.append(f"{where}: return a Measurement (or list/dict of them), a Comparison, or None; "
                            f"annotated {ret!r}")
        elif "Comparison" in str(ret) and not name.startswith("compare"):
            problems.append(f"{where}: a function returning a Comparison is named compare*")
    assert not problems, "\n".join(problems)


def test_every_claim_has_a_negative_control(lesson: ModuleType):
    found = claims(lesson)
    assert found, f"{lesson.__name__}: mark at least one claim check with @claim('...')"
    test_file = LESSON_TESTS / f"test_{topic(lesson)}.py"
    assert test_file.exists(), f"{lesson.__name__}: its claims are asserted in {test_file.relative_to(ROOT)}"
    tree = ast.parse(test_file.read_text())
    prefix = f"test_{topic(lesson)}_claim_fails_without_the_fix"
    controls = [ast.unparse(f) for f in ast.walk(tree)
                if isinstance(f, ast.FunctionDef) and f.name.startswith(prefix)]
    problems = []
    for name, fn in found.items():
        if "cluster" in inspect.signature(fn).parameters:
            problems.append(f"{name}: a claim checks measurements, not the cluster")
        if not any(re.search(rf"\b{name}\(", src) for src in controls):
            problems.append(f"{name}: no {prefix}* test calls it on the 'before' and expects AssertionError")
    assert not problems, f"{lesson.__name__}:\n" + "\n".join(problems)


def test_tasks_are_named_after_the_lesson(lesson: ModuleType):
    tree = ast.parse(inspect.getsource(lesson))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and getattr(dec.func, "id", "") == "shared_task":
                    names = [k.value.value for k in dec.keywords if k.arg == "name"]
                    if not names or not names[0].startswith(f"{topic(lesson)}."):
                        bad.append(node.name)
    assert not bad, f"{lesson.__name__}: name these tasks '{topic(lesson)}.<name>': {bad}"


def test_lessons_do_not_reach_under_the_cluster(lesson: ModuleType):
    source = inspect.getsource(lesson)
    tree = ast.parse(source)
    imports = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    under = [i for i in imports if "services" in i]
    assert not under, f"{lesson.__name__}: imports {under}; ask the cluster instead (add_worker, add_beat)"
    assert not re.search(r"\bspawn\(|subprocess\.Popen\(\[sys\.executable, \"-m\", \"celery\"", source), (
        f"{lesson.__name__}: starts processes by hand; ask the cluster")
    loops = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.While)
             and any(isinstance(c, ast.Call) and getattr(c.func, "attr", "") == "sleep" for c in ast.walk(n))]
    assert not loops, (f"{lesson.__name__}: hand-written polling loops at lines {loops}; "
                       "use labkit.poll.poll_until")
