"""Grades a copy of the repository: runs the exercise tests (tests/exercises/) and prints, per
exercise, how many of its tests pass.

    python assignments/grade.py            # this repository: every exercise passes
    python assignments/grade.py DIR        # a student copy written by make.py

A test belongs to the exercise whose marker it carries (`pytest -m NAME` runs the same tests). A
test file that does not even import (a syntax error in the student's module, say) scores 0 of the
tests it defines, and is named above the table.
"""

import argparse
import ast
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

from make import EXERCISES


class Tally:
    """A pytest plugin counting, per exercise marker, the tests collected and the tests passed."""

    def __init__(self):
        self.exercise_of, self.total, self.passed, self.broken = {}, Counter(), Counter(), []

    def pytest_collection_modifyitems(self, items):
        for item in items:
            for name in EXERCISES:
                if item.get_closest_marker(name):
                    self.exercise_of[item.nodeid] = name
                    self.total[name] += 1

    def pytest_collectreport(self, report):
        if report.failed:
            self.broken.append(report.nodeid or "tests/conftest.py")

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and report.passed and report.nodeid in self.exercise_of:
            self.passed[self.exercise_of[report.nodeid]] += 1


def defined_tests(path):
    """Number of `test_*` functions in a test file, read without importing it."""
    return sum(isinstance(n, ast.FunctionDef) and n.name.startswith("test_") for n in ast.parse(path.read_text()).body)


def grade(root, plugins=()):
    """{exercise: (passed, total)} for the copy at `root`; `plugins` are more pytest plugins for the run
    (tests/test_assignments.py traces and blanks the exercises of this repository with them)."""
    tally, cwd = Tally(), os.getcwd()
    os.chdir(root)  # the copy's pytest.ini puts the copy's modules first on sys.path
    try:
        pytest.main(["-q", "-p", "no:cacheprovider", "--no-header", "--tb=no", "-o", "console_output_style=classic",
                     "--continue-on-collection-errors",
                     "tests/exercises"], plugins=[tally, *plugins])
    finally:
        os.chdir(cwd)
    if tally.broken:
        print(f"did not import: {', '.join(tally.broken)} (run `python -m pytest tests/exercises` there to see why)")
    for name in EXERCISES:  # a test file that did not import: its tests count, none passes
        if tally.total[name] == 0:
            tally.total[name] = defined_tests(Path(root) / "tests" / "exercises" / f"test_{name}.py")
    return {name: (tally.passed[name], tally.total[name]) for name in EXERCISES}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Grade the exercises of a copy of the repository.")
    parser.add_argument("dir", nargs="?", default=str(Path(__file__).resolve().parent.parent),
                        help="the copy to grade (default: this repository)")
    root = Path(parser.parse_args(argv).dir).resolve()
    if not (root / "tests" / "exercises").is_dir():
        parser.error(f"{root} has no tests/exercises folder: give the root of a copy written by make.py")
    scores = grade(root)
    width = max(map(len, scores))
    print(f"\n{'exercise'.ljust(width)}  passed / total")
    for name, (passed, total) in scores.items():
        print(f"{name.ljust(width)}  {passed:>6} / {total}")
    print(f"{'all'.ljust(width)}  {sum(p for p, _ in scores.values()):>6} / {sum(t for _, t in scores.values())}")


if __name__ == "__main__":
    sys.exit(main())
