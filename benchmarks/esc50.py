"""ESC-50 (Piczak, 2015) -> manifests: 2,000 five-second clips of 50 environmental sounds.

Official layout: ROOT/meta/esc50.csv with the columns filename, fold, target, category, esc10,
src_file, take; the clips in ROOT/audio/*.wav, 5 s mono at 44.1 kHz. Class k is the category whose
target is k (classes.txt keeps that order, with underscores as spaces).

Protocols:
- zero-shot (default): all 2,000 clips are the test split, as ImageBind and ViT-Lens report it;
- `--fold K`: the 5-fold protocol, fold K the test split and the other four the train split.
prompts.txt holds "this is the sound of {}.", the template Microsoft's CLAP evaluates ESC-50 with.

  python benchmarks/esc50.py ESC-50-master --out data/esc50
  python eval.py --ckpt RUN/ckpt.pt --data data/esc50/esc50.jsonl --classes @data/esc50/classes.txt \\
      --prompts @data/esc50/prompts.txt
"""
import argparse
import csv
import os
import sys
import wave

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import Writer, readable_name, refuse, require  # noqa: E402

COLUMNS = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]
PROMPTS = ["this is the sound of {}."]


def wav_problem(path):
    """None for a WAV whose header reads and holds samples, else what is wrong with it."""
    if not os.path.exists(path):
        return "file is missing"
    try:
        with wave.open(path, "rb") as w:
            return None if w.getnframes() > 0 else "WAV file has 0 samples"
    except (wave.Error, EOFError) as error:
        return f"not a readable WAV file ({error})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="the ESC-50 folder as downloaded (holding meta/ and audio/)")
    p.add_argument("--out", required=True, help="folder for esc50.jsonl, classes.txt, prompts.txt, skipped.log")
    p.add_argument("--fold", type=int, choices=range(1, 6), metavar="K",
                   help="5-fold protocol: fold K (1-5) is the test split, the others train (default: zero-shot, all test)")
    args = p.parse_args(argv)
    meta = require(os.path.join(args.root, "meta", "esc50.csv"), "ESC-50's metadata table meta/esc50.csv")
    require(os.path.join(args.root, "audio"), "ESC-50's clips folder audio/")
    with open(meta, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or any(c not in reader.fieldnames for c in COLUMNS):
            refuse(f"{meta} lacks the columns {[c for c in COLUMNS if c not in (reader.fieldnames or [])]}")
        rows = list(reader)
    names = {}
    for row in rows:
        names.setdefault(int(row["target"]), readable_name(row["category"]))
    classes = [names[k] for k in sorted(names)]
    writer = Writer(args.out, "esc50")
    for row in rows:
        path = os.path.join(args.root, "audio", row["filename"])
        if (problem := wav_problem(path)) is not None:
            writer.skip(path, problem)
            continue
        split = "test" if args.fold is None or int(row["fold"]) == args.fold else "train"
        writer.add("audio", path, readable_name(row["category"]), split)
    writer.finish(classes, PROMPTS)


if __name__ == "__main__":
    main()
