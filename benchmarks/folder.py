"""Any tree of class folders -> a manifest: how to bring your own data, in any modality.

Layouts: ROOT/train/<class>/<file> with ROOT/test/<class>/<file> (or val/) when present; else
ROOT/<class>/<file>, split per class with a seeded shuffle (`--test-fraction`, `--seed`). Files
are those a reader of the modality takes (readers.py); a video may also be a folder of frames.
Class names are the folder names, underscores read as spaces.

  python benchmarks/folder.py my_sounds --modality audio --out data/my_sounds
"""
import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import Writer, readable_name, refuse  # noqa: E402

IMAGES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif"}
SUFFIXES = {"image": IMAGES, "tactile": IMAGES, "depth": {".png", ".npy"}, "audio": {".wav"},
            "point": {".npy", ".npz", ".txt", ".xyz", ".ply", ".off"}, "video": {".gif", ".webp", ".npy"},
            "imu": {".npy", ".csv"}, "eeg": {".npy", ".csv"}}


def samples(folder, modality):
    """(path, class) of every usable entry under folder/<class>/, and (path, reason) of the rest."""
    found, skipped = [], []
    for name in sorted(os.listdir(folder)):
        class_dir = os.path.join(folder, name)
        if not os.path.isdir(class_dir):
            continue
        for entry in sorted(os.listdir(class_dir)):
            path = os.path.join(class_dir, entry)
            frames = modality == "video" and os.path.isdir(path)
            if frames or os.path.splitext(entry)[1].lower() in SUFFIXES[modality]:
                found.append((path, readable_name(name)))
            else:
                skipped.append((path, f"not a {modality} file (takes {' '.join(sorted(SUFFIXES[modality]))})"))
    return found, skipped


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="a folder of class folders, or of train/ and test/ (or val/) folders of class folders")
    p.add_argument("--modality", required=True, choices=sorted(SUFFIXES), help="the modality of every file")
    p.add_argument("--out", required=True, help="folder for <root name>.jsonl, classes.txt, skipped.log")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of each class in the test split "
                                                                    "when ROOT has no train/ and test/ (default: 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of that split (default: 0)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.root):
        refuse(f"{args.root} is missing: a folder of class folders")
    test_dir = next((os.path.join(args.root, d) for d in ("test", "val") if os.path.isdir(os.path.join(args.root, d))), None)
    train_dir = os.path.join(args.root, "train")
    writer = Writer(args.out, os.path.basename(os.path.normpath(args.root)))
    if os.path.isdir(train_dir) != (test_dir is not None):
        refuse(f"{args.root} has {'train/ but no test/ or val/' if test_dir is None else 'test/ or val/ but no train/'}")
    if test_dir is not None:
        parts = {"train": samples(train_dir, args.modality), "test": samples(test_dir, args.modality)}
    else:
        found, skipped = samples(args.root, args.modality)
        rng, parts = random.Random(args.seed), {"train": ([], skipped), "test": ([], [])}
        for name in sorted({c for _, c in found}):
            files = [s for s in found if s[1] == name]
            rng.shuffle(files)
            cut = round(len(files) * args.test_fraction)
            parts["test"][0].extend(files[:cut])
            parts["train"][0].extend(files[cut:])
    for split, (found, skipped) in parts.items():
        for path, name in found:
            writer.add(args.modality, path, name, split)
        for path, reason in skipped:
            writer.skip(path, reason)
    if not writer.rows:
        refuse(f"no {args.modality} file found under {args.root}/<class>/")
    writer.finish(sorted({row["label"] for row in writer.rows}))


if __name__ == "__main__":
    main()
