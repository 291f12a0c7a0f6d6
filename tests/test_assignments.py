"""Tests for assignments/: make.py lists and blanks the exercises, the copy holds no solution, each
exercise's tests fail while its functions are blank and only then, and grade.py scores a copy.

Each exercise stands alone: a blank exercise fails all its own tests and no other exercise's. A blank
function differs from the solution only once it is called: it raises NotImplementedError. So this holds
if (1) every test of exercise X fails while X's functions raise, and (2) no test of X calls, directly or
through other code, a function of another exercise Y, so that blanking Y cannot reach it. Both are
checked in this process, on this repository, from make.EXERCISES alone, instead of grading a copy per
exercise: (1) by running each exercise test with its exercise's functions blanked as make.py blanks
them, (2) by tracing which exercise functions each test calls. Code run at import is outside the trace:
the full copy's `pytest -m prior` collects every test module of a copy with all exercises blank. One
copy written by make.py is graded for real, end to end.
"""

import ast
import configparser
import importlib
import inspect
import subprocess
import sys
import types
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "assignments"))

from grade import grade  # noqa: E402
from make import EXERCISES, SOLUTION_TESTS, blank as blank_source, find, main as make  # noqa: E402


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def scores(copy):
    """{exercise: (passed, total)} from grade.py's table for `copy`, graded in a new process (the copy's
    modules have the same names as this repository's)."""
    out = run("assignments/grade.py", str(copy)).stdout.splitlines()
    table = out[out.index(next(line for line in out if line.startswith("exercise"))) + 1:]
    return {line.split()[0]: (int(line.split()[1]), int(line.split()[3])) for line in table if line.split()[0] in EXERCISES}


def function(target):
    """The function object of "module:qualified.name", under any decorators (functools.cache, torch.no_grad)."""
    module, qualname = target.split(":")
    found = importlib.import_module(module)
    for name in qualname.split("."):
        found = getattr(found, name)
    found = inspect.unwrap(found)
    assert found.__code__.co_qualname == qualname, f"{target} resolves to {found.__code__.co_qualname}"
    return found


def blank_code(target, name):
    """The code of `target` as make.py blanks it for exercise `name`: make.blank's source, compiled."""
    module, qualname = target.split(":")
    path = ROOT / f"{module}.py"
    pending = [compile(blank_source(path.read_text(encoding="utf-8"), [qualname], name), str(path), "exec")]
    while pending:  # the function's code is a constant of its module's code, or of its class's
        code = pending.pop()
        if code.co_qualname == qualname:
            return code
        pending += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    raise AssertionError(f"{target}: no code named {qualname} in make.py's blank of {path.name}")


@contextmanager
def blanked(functions, names):
    """The functions of exercises `names` raise NotImplementedError, as in a copy, wherever they are
    referenced: each function object keeps its identity and decorators and gets the blank's code."""
    originals = {target: functions[target].__code__ for name in names for target in EXERCISES[name]}
    try:
        for name in names:
            for target in EXERCISES[name]:
                functions[target].__code__ = blank_code(target, name)
        yield
    finally:
        for target, code in originals.items():
            functions[target].__code__ = code


def clear_caches():
    """Empty the functools caches at the top of the repository's modules before each test: a cached
    function answers a repeated call without running (mel_filter_bank is one), so a test could reach an
    exercise's function through an earlier test's cache, unseen by the trace and unchanged by a blank."""
    for module in list(sys.modules.values()):
        if Path(getattr(module, "__file__", None) or "/").parent == ROOT:
            for value in list(vars(module).values()):
                if callable(getattr(value, "cache_clear", None)):
                    value.cache_clear()


def exercises_of(item):
    return [name for name in EXERCISES if item.get_closest_marker(name)]


class Trace:
    """A pytest plugin recording, per test, the exercise functions it calls: in its setup, its call and
    its teardown, and in the setup of every fixture it uses, even when that fixture was made for an earlier
    test and cached (a session fixture calling a blank function would fail each test that uses it)."""

    def __init__(self, functions):
        self.target_of = {f.__code__: target for target, f in functions.items()}  # code -> "module:function"
        self.exercises, self.fixtures = {}, {}  # test -> its exercise markers, the fixtures it uses
        self.calls, self.fixture_calls = defaultdict(set), defaultdict(set)  # -> {"module:function"}
        self.into = []  # where the running code's calls are recorded: the test's set, any fixture's being made

    def trace(self, frame, event, arg):  # sys.settrace: called as each Python frame starts
        if event == "call" and frame.f_code in self.target_of:
            for calls in self.into:
                calls.add(self.target_of[frame.f_code])
        # returning None: no tracing of the lines within the frame

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item):
        self.exercises[item.nodeid], self.fixtures[item.nodeid] = exercises_of(item), item.fixturenames
        clear_caches()
        self.into, previous = [self.calls[item.nodeid]], sys.gettrace()
        sys.settrace(self.trace)
        try:
            return (yield)
        finally:
            sys.settrace(previous)
            self.into = []

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef):
        self.into.append(self.fixture_calls[fixturedef.argname])
        try:
            return (yield)
        finally:
            self.into.pop()

    def called(self, test):
        """The exercise functions `test` calls, itself or through its fixtures."""
        return set().union(self.calls[test], *(self.fixture_calls[f] for f in self.fixtures[test]))


class Blank:
    """A pytest plugin running each exercise test with its own exercise's functions blank; it names the
    tests that pass all the same."""

    def __init__(self, functions):
        self.functions, self.passed = functions, []

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item):
        clear_caches()
        with blanked(self.functions, exercises_of(item)):
            return (yield)

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and report.passed:
            self.passed.append(report.nodeid)


@pytest.fixture(scope="module")
def functions():
    """{"module:qualified.name": function} for every exercise, imported here and not at the top: a
    broken module in a student copy fails only the tests that use it."""
    found = {target: function(target) for targets in EXERCISES.values() for target in targets}
    assert len({f.__code__ for f in found.values()}) == sum(map(len, EXERCISES.values())), "a function listed twice"
    return found


@pytest.fixture(scope="module")
def full_copy(tmp_path_factory):
    """A student copy with every exercise blank, shared by the tests that only read it."""
    copy = tmp_path_factory.mktemp("full") / "copy"
    make([str(copy)])
    return copy


@pytest.fixture(scope="module")
def solution(functions):
    """grade.py's table for this repository, {exercise: (passed, total)}, and the trace of its run."""
    trace = Trace(functions)
    return grade(ROOT, plugins=[trace]), trace


def test_list_prints_the_registered_exercises_each_with_its_own_tests():
    names = run("assignments/make.py", "--list").stdout.split()
    assert names == list(EXERCISES) and len(names) >= 10
    config = configparser.ConfigParser()
    config.read(ROOT / "pytest.ini")
    registered = [line.split(":")[0].strip() for line in config["pytest"]["markers"].strip().splitlines()]
    assert sorted(registered) == sorted(names)
    for name in names:
        tree = ast.parse((ROOT / "tests" / "exercises" / f"test_{name}.py").read_text())
        assert f"pytest.mark.{name}" in ast.unparse(tree)  # the file's tests carry the exercise's marker


def test_the_copy_blanks_each_function_and_keeps_its_docstring(full_copy):
    everything = {ast.unparse(s) for p in full_copy.rglob("*.py")  # the copy's assignments and returns
                  for s in ast.walk(ast.parse(p.read_text())) if isinstance(s, (ast.Assign, ast.Return))}
    for name, targets in EXERCISES.items():
        for target in targets:
            module, qualname = target.split(":")
            original = find(ast.parse((ROOT / f"{module}.py").read_text()), qualname)
            blank = find(ast.parse((full_copy / f"{module}.py").read_text()), qualname)
            assert ast.get_docstring(blank) == ast.get_docstring(original)
            assert len(blank.body) == 2 and f"exercise {name}:" in ast.unparse(blank.body[1])
            # no statement of the solution is left anywhere in the copy
            solution = {ast.unparse(s) for s in ast.walk(original) if isinstance(s, ast.stmt) and s is not original}
            assert not {s for s in solution if len(s) > 30} & everything, target
    for targets in SOLUTION_TESTS.values():
        for target in targets:
            path, qualname = target.split(":")
            assert f"def {qualname}(" not in (full_copy / path).read_text()
    assert (full_copy / "assignments" / "expected.json").is_file()
    with pytest.raises(SystemExit):  # never over a folder that has files
        make([str(full_copy)])


def test_each_exercise_test_passes_and_calls_its_own_exercise_and_no_other(solution):
    """With the solution every exercise test passes; each carries one exercise's marker, calls at least
    one of that exercise's functions, and calls no function of another exercise (so blanking another
    exercise cannot fail it)."""
    table, trace = solution
    assert all(passed == total > 0 for passed, total in table.values()), table
    for test, exercises in trace.exercises.items():
        assert len(exercises) == 1, f"{test} carries the markers of {exercises or 'no exercise'}"
        name, called = exercises[0], trace.called(test)
        assert set(EXERCISES[name]) & called, f"{test} ({name}) calls none of {EXERCISES[name]}"
        others = [f"{target} of exercise {other}" for other, targets in EXERCISES.items() if other != name
                  for target in targets if target in called]
        assert not others, f"{test} ({name}) calls {', '.join(others)}"


def test_each_exercise_test_fails_while_its_exercise_is_blank(functions, solution):
    """Each exercise test, run with its exercise's functions blank as in a copy, fails: it needs them and
    no try/except or pytest.raises swallows the NotImplementedError."""
    blank = Blank(functions)
    table, blank_table = solution[0], grade(ROOT, plugins=[blank])
    assert not blank.passed, f"pass with their exercise blank: {blank.passed}"
    assert blank_table == {name: (0, total) for name, (_, total) in table.items()}, blank_table


def test_pytest_m_name_checks_one_exercise_in_a_full_copy(full_copy, solution):
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "prior", "-p", "no:cacheprovider"],
                            cwd=full_copy, capture_output=True, text=True, timeout=600)
    summary = result.stdout.splitlines()[-1]  # every test of the copy collected cleanly, the prior's run
    assert result.returncode == 1 and "error" not in summary and f"{solution[0]['prior'][1]} failed" in summary


def test_a_copy_fails_its_blank_exercise_alone_and_grade_counts_a_file_that_does_not_import(tmp_path):
    """End to end, one copy by make.py --only attention, graded by grade.py: attention's tests all fail,
    and those of every exercise in a module that imports pass; losses.py, with a student's syntax error,
    scores 0 of its exercises' tests."""
    copy = tmp_path / "copy"
    make([str(copy), "--only", "attention"])
    with open(copy / "losses.py", "a") as f:
        f.write("\ndef broken(:\n")  # a student's syntax error
    table = scores(copy)
    in_losses = {name for name, targets in EXERCISES.items() if any(t.startswith("losses:") for t in targets)}
    assert in_losses and "attention" not in in_losses
    for name, (passed, total) in table.items():
        assert total > 0 and passed == (0 if name == "attention" or name in in_losses else total), (name, passed, total)
