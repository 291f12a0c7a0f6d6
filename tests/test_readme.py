"""Tests of README.md against the code: every file it names exists, every flag it names is a flag of
the script it is given to, and its Python API snippet runs after a smoke run and prints what the
README shows it printing (one prediction and one true name per sample, from the classes it names)."""

import ast
import contextlib
import io
import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SCRIPTS = ["train.py", "eval.py", "bench.py", "paper_scale.py", "ablations.py", "assignments/make.py",
           "assignments/grade.py", "benchmarks/esc50.py", "benchmarks/modelnet40.py", "benchmarks/folder.py"]


# what runs and prepare scripts write; the README names them as outputs, not as repository files
RUN_OUTPUTS = {"metrics.json", "metrics.md", "log.jsonl", "loss_curves.png", "routing.png", "similarity.png", "ckpt.pt",
               "anchor.pt", "eval_data.json", "classes.txt", "prompts.txt", "skipped.log", "ablations.md",
               "ablations.json", "ablations.png", "ViT-B-16.pt", "ViT-L-14.pt", "bpe_simple_vocab_16e6.txt.gz"}


def named_paths(text):
    """Repository paths the text names: markdown link targets and `code` spans that look like files."""
    links = re.findall(r"\]\(([^)#\s]+)", text)
    spans = re.findall(r"`([\w./-]+\.(?:py|md|txt|ini|json|png|pt|gz))`", text)
    return {p for p in links + spans if not p.startswith(("http", "out/", "runs/", "RUN/", "data/"))}


def test_every_file_the_readme_names_exists():
    """A path with a folder exists as written; a bare file name is a repository file's name, or one of
    the files a run writes."""
    tracked = {p.name for p in ROOT.rglob("*") if ".git" not in p.parts}
    paths = named_paths(README)
    assert len(paths) >= 10
    missing = sorted(p for p in paths if not ((ROOT / p).exists() if "/" in p else p in tracked | RUN_OUTPUTS))
    assert not missing, missing


def help_of(script, monkeypatch):
    """The --help text of a script, run in this process as `python SCRIPT --help` would run it."""
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.syspath_prepend(str((ROOT / script).parent))
    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.raises(SystemExit):
        runpy.run_path(str(ROOT / script), run_name="__main__")
    return text.getvalue()


@pytest.fixture
def helps(monkeypatch):
    """{script: its --help text}."""
    return {s: help_of(s, monkeypatch) for s in SCRIPTS}


def command_lines(text):
    """The command lines of the text: each line of its fenced code blocks (a trailing backslash joins
    the next), and each inline `code` span, that names one of the SCRIPTS."""
    lines, fenced, inside = [], [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
        elif inside:
            fenced.append(line)
        else:
            lines += re.findall(r"`([^`]+)`", line)
    lines += "\n".join(fenced).replace("\\\n", " ").splitlines()
    return [line.split("#")[0] for line in lines if any(s in line.split() for s in SCRIPTS)]


def test_every_flag_the_readme_gives_a_script_is_one_of_its_flags(helps):
    """Each command line of the README (python SCRIPT ..., torchrun ... SCRIPT ...): each --flag after
    the script is in the script's --help."""
    checked = 0
    for line in command_lines(README):
        words = line.split()
        script = next(w for w in words if w in SCRIPTS)
        flags = [w.split("=")[0] for w in words[words.index(script) + 1:] if w.startswith("--")]
        # a flag counts only whole: `--train` is not found inside `--train-sizes`
        unknown = [f for f in flags if re.search(rf"{re.escape(f)}(?![\w-])", helps[script]) is None]
        assert not unknown, (line, unknown)
        checked += len(flags)
    assert checked >= 10


def test_the_python_api_snippet_runs_after_a_smoke_run_and_prints_what_the_readme_shows(smoke, tmp_path, monkeypatch):
    section = README[README.index("## Python API"):]
    code, printed = re.findall(r"```python\n(.*?)```", section, re.S)[0], re.findall(r"```text\n(.*?)```", section, re.S)[0]
    ast.parse(code)
    (tmp_path / "out").symlink_to(smoke)
    monkeypatch.chdir(tmp_path)
    output, namespace = io.StringIO(), {"__name__": "readme"}
    with contextlib.redirect_stdout(output):
        exec(compile(code, "README.md", "exec"), namespace)
    shown, ran = printed.strip().splitlines(), output.getvalue().strip().splitlines()
    assert [line.split(":")[0] for line in ran] == [line.split(":")[0] for line in shown]  # "predicted", "true"
    for line, reference in zip(ran, shown):
        names, expected = ast.literal_eval(line.split(":", 1)[1].strip()), ast.literal_eval(reference.split(":", 1)[1].strip())
        assert len(names) == len(expected) and set(names) <= set(namespace["names"])  # the dataset's own class names


def test_the_run_the_readme_shows_has_the_table_a_run_writes(smoke):
    """The zero-shot table pasted under "What a run does, and prints" has the header and the columns of
    the table a run writes to metrics.md today: a README pasted from older code fails."""
    section = README[README.index("## What a run does, and prints"):README.index("## Results")]
    shown = re.findall(r"```text\n(.*?)```", section, re.S)[0].splitlines()
    written = (smoke / "metrics.md").read_text().splitlines()
    header = next(line for line in shown if line.startswith("| modality"))
    assert header in written
    rows = shown[shown.index(header):]
    assert {line.count("|") for line in rows if line.startswith("|")} == {header.count("|")}
