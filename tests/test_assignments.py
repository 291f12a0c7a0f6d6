"""Tests for assignments/: make.py lists and blanks the exercises, the copy holds no solution, each
exercise's tests fail while its function is blank and only then, and grade.py scores a copy."""

import ast
import configparser
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "assignments"))

from make import EXERCISES, SOLUTION_TESTS, find, main as make  # noqa: E402


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def scores(copy):
    """{exercise: (passed, total)} from grade.py's table for `copy`."""
    out = run("assignments/grade.py", str(copy)).stdout.splitlines()
    table = out[out.index(next(line for line in out if line.startswith("exercise"))) + 1:]
    return {line.split()[0]: (int(line.split()[1]), int(line.split()[3])) for line in table if line.split()[0] in EXERCISES}


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


def test_the_copy_blanks_each_function_and_keeps_its_docstring(tmp_path):
    make([str(tmp_path / "copy")])
    everything = {ast.unparse(s) for p in (tmp_path / "copy").rglob("*.py")  # the copy's assignments and returns
                  for s in ast.walk(ast.parse(p.read_text())) if isinstance(s, (ast.Assign, ast.Return))}
    for name, targets in EXERCISES.items():
        for target in targets:
            module, qualname = target.split(":")
            original = find(ast.parse((ROOT / f"{module}.py").read_text()), qualname)
            blank = find(ast.parse((tmp_path / "copy" / f"{module}.py").read_text()), qualname)
            assert ast.get_docstring(blank) == ast.get_docstring(original)
            assert len(blank.body) == 2 and f"exercise {name}:" in ast.unparse(blank.body[1])
            # no statement of the solution is left anywhere in the copy
            solution = {ast.unparse(s) for s in ast.walk(original) if isinstance(s, ast.stmt) and s is not original}
            assert not {s for s in solution if len(s) > 30} & everything, target
    for targets in SOLUTION_TESTS.values():
        for target in targets:
            path, qualname = target.split(":")
            assert f"def {qualname}(" not in (tmp_path / "copy" / path).read_text()
    assert (tmp_path / "copy" / "assignments" / "expected.json").is_file()
    with pytest.raises(SystemExit):  # never over a folder that has files
        make([str(tmp_path / "copy")])


def test_each_exercise_fails_while_blank_and_alone(tmp_path):
    """A copy per exercise with only that one blanked: its tests all fail, every other exercise passes."""
    def grade_alone(name):
        copy = tmp_path / name
        make([str(copy), "--only", name])
        return name, scores(copy)

    with ThreadPoolExecutor(2) as pool:
        for name, table in pool.map(grade_alone, EXERCISES):
            for other, (passed, total) in table.items():
                assert total > 0
                assert passed == (0 if other == name else total), (name, other, passed, total)


def test_pytest_m_name_checks_one_exercise_in_a_full_copy(tmp_path):
    solution = scores(ROOT)
    assert all(passed == total > 0 for passed, total in solution.values())
    copy = tmp_path / "copy"
    make([str(copy)])
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "prior", "-p", "no:cacheprovider"],
                            cwd=copy, capture_output=True, text=True, timeout=600)
    summary = result.stdout.splitlines()[-1]  # every test of the copy collected cleanly, the prior's run
    assert result.returncode == 1 and "error" not in summary and f"{solution['prior'][1]} failed" in summary


def test_grade_counts_a_file_that_does_not_import_as_failed(tmp_path):
    copy = tmp_path / "copy"
    make([str(copy), "--only", "attention"])
    with open(copy / "losses.py", "a") as f:
        f.write("\ndef broken(:\n")  # a student's syntax error
    table = scores(copy)
    for name in ("load_balance", "soft_targets", "binding", "anchor", "prior"):  # the exercises in losses.py
        assert table[name][0] == 0 and table[name][1] > 0
    assert table["attention"][0] == 0 and table["bpe_merges"][0] == table["bpe_merges"][1]
