"""Writes a student copy of this repository: the same files, with the exercises' function bodies
replaced by `raise NotImplementedError("exercise NAME: ...")`, their docstrings kept as the task.

    python assignments/make.py --list                       # the exercise names, one per line
    python assignments/make.py OUT                          # every exercise blanked, in a new folder OUT
    python assignments/make.py OUT --only attention prior   # only these

The solution code carries no markers: the functions to blank are listed below by module and
qualified name, and found with `ast`. Tests that would give a solution away (a transcription of
the equations, a brute-force reference) are listed too and left out of the copy. Each exercise is
checked by `pytest -m NAME` (tests/exercises/test_NAME.py); assignments/README.md is the course sheet.
"""

import argparse
import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# exercise -> the functions a student writes, as "module:qualified.name"
EXERCISES = {
    "conv_tokenizer": ["tokenizers:ConvTokenizer.forward"],
    "farthest_point_sampling": ["tokenizers:farthest_point_sampling"],
    "attention": ["clip:attention"],
    # bench.py's loop-over-experts baseline computes the same sum, so it is blanked with the exercise
    "lora_expert": ["lora_moe:LoRAMoELinear.add_expert_update", "lora_moe:LoRAMoELinear.merge",
                    "bench:LoopLoRAMoELinear.add_expert_update"],
    "top_k_routing": ["lora_moe:LoRAMoELinear.route"],
    "load_balance": ["losses:load_balance_loss"],
    "soft_targets": ["losses:caption_logits", "losses:soft_targets"],
    "binding": ["losses:soft_binding_loss"],
    "anchor": ["losses:anchor_distillation_loss"],
    "prior": ["losses:prior_distillation_loss"],
    "bpe_merges": ["bpe:learn_merges"],
    "mel_filter_bank": ["preprocess:mel_filter_bank"],
}

# tests (and their helpers) that hold another implementation of an exercise: not in the copy
SOLUTION_TESTS = {
    "binding": ["tests/test_losses.py:test_parity_with_a_transcription_of_eq_4_to_9"],
    "farthest_point_sampling": ["tests/test_tokenizers.py:brute_force_fps",
                                "tests/test_tokenizers.py:test_farthest_point_sampling_matches_brute_force_and_spreads_points"],
}


def find(tree, qualname):
    """The def or class node `qualname` ("Class.method" or "function") at the top of `tree`."""
    scope = tree
    for name in qualname.split("."):
        nodes = [n for n in scope.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name]
        if not nodes:
            raise SystemExit(f"make.py: {qualname} not found; update EXERCISES or SOLUTION_TESTS in {__file__}")
        scope = nodes[0]
    return scope


def blank(source, qualnames, exercise):
    """The source with each function's body after its docstring replaced by one `raise`."""
    tree, lines = ast.parse(source), source.splitlines(keepends=True)
    edits = []
    for qualname in qualnames:
        node = find(tree, qualname)
        if ast.get_docstring(node) is None or len(node.body) < 2:
            raise SystemExit(f"make.py: {qualname} needs a docstring (the task statement) and a body")
        docstring, first = node.body[0], node.body[1]
        message = f"exercise {exercise}: write {qualname} (assignments/README.md)"
        edits.append((docstring.end_lineno, node.end_lineno,
                      f"{' ' * first.col_offset}raise NotImplementedError({message!r})\n"))
    for start, end, text in sorted(edits, reverse=True):
        lines[start:end] = [text]
    return "".join(lines)


def remove(source, qualnames):
    """The source without these top-level functions (decorators included) and the blank lines after them."""
    tree, lines = ast.parse(source), source.splitlines(keepends=True)
    spans = []
    for qualname in qualnames:
        node = find(tree, qualname)
        start = (node.decorator_list[0] if node.decorator_list else node).lineno - 1
        end = node.end_lineno
        while end < len(lines) and not lines[end].strip():
            end += 1
        spans.append((start, end))
    for start, end in sorted(spans, reverse=True):
        del lines[start:end]
    return "".join(lines)


def repository_files():
    """Paths (relative to the root) of the files a clone has: tracked and untracked-but-not-ignored."""
    try:
        listing = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but caches and hidden folders
        listing = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and not any(
            part.startswith(".") or part == "__pycache__" for part in p.relative_to(ROOT).parts)]
    return [Path(p) for p in listing if (ROOT / p).is_file()]


def make(out, names):
    """Copy the repository to `out` (which must not exist or be empty) with `names` blanked."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"make.py: {out} is not empty; give a new folder")
    edits = {}  # file -> (functions to blank per exercise, functions to remove)
    for name in names:
        for target in EXERCISES[name]:
            module, qualname = target.split(":")
            edits.setdefault(f"{module}.py", ({}, []))[0].setdefault(name, []).append(qualname)
        for target in SOLUTION_TESTS.get(name, []):
            path, qualname = target.split(":")
            edits.setdefault(path, ({}, []))[1].append(qualname)
    for path in repository_files():
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        if str(path) not in edits:
            shutil.copy2(ROOT / path, out / path)
            continue
        source = (ROOT / path).read_text(encoding="utf-8")
        blanks, removals = edits.pop(str(path))
        for exercise, qualnames in blanks.items():
            source = blank(source, qualnames, exercise)
        source = remove(source, removals)
        compile(source, str(path), "exec")  # the copy must still import
        (out / path).write_text(source, encoding="utf-8")
    if edits:
        raise SystemExit(f"make.py: {sorted(edits)} not found in the repository")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write a student copy of the repository with exercises blanked.")
    parser.add_argument("out", nargs="?", help="a new (or empty) folder for the student copy")
    parser.add_argument("--list", action="store_true", help="print the exercise names, one per line, and stop")
    parser.add_argument("--only", nargs="+", choices=list(EXERCISES), metavar="NAME",
                        help="blank only these exercises (default: all); names from --list")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(EXERCISES))
        return
    if args.out is None:
        parser.error("give OUT, the folder to write the student copy to (or --list)")
    names = args.only or list(EXERCISES)
    make(args.out, names)
    print(f"wrote a student copy to {args.out} with {len(names)} exercise(s) blanked: {' '.join(names)}")
    print(f"check one with: cd {args.out} && python -m pytest -m {names[0]}")


if __name__ == "__main__":
    sys.exit(main())
