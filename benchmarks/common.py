"""What every prepare script shares: refusing a tree in one line, writing manifests, class names and
prompts, and the summary of what was written and what was skipped, and why.

A prepare script turns a dataset as it is downloaded into manifests that manifest.ManifestDataset
reads (docs/method.md section 6), plus DIR/classes.txt (one class name a line, in the benchmark's
official order) and, where the literature fixed them, DIR/prompts.txt (one template a line, {} for
the class name), for `eval.py --ckpt RUN/ckpt.pt --data DIR/NAME.jsonl --classes @DIR/classes.txt
--prompts @DIR/prompts.txt`.
"""

import json
import os
import sys
from collections import Counter


def refuse(message):
    """A tree that is not the expected layout: one line saying what is missing, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def require(path, what):
    if not os.path.exists(path):
        refuse(f"{path} is missing: {what}")
    return path


class Writer:
    """Collects manifest lines and skipped files; `finish` writes them and prints the summary."""

    def __init__(self, out, name):
        self.out, self.name = out, name
        self.rows, self.skipped = [], []
        os.makedirs(out, exist_ok=True)

    def add(self, modality, path, label, split=None):
        """One sample; its path is written relative to the manifest's folder."""
        row = {"modality": modality, "path": os.path.relpath(path, self.out), "label": label}
        self.rows.append(row if split is None else {**row, "split": split})

    def skip(self, path, reason):
        self.skipped.append(f"{path}: {reason}")

    def finish(self, classes, prompts=None):
        """Write OUT/<name>.jsonl, classes.txt, prompts.txt and skipped.log; print the summary."""
        manifest = os.path.join(self.out, f"{self.name}.jsonl")
        with open(manifest, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in self.rows)
        with open(os.path.join(self.out, "classes.txt"), "w") as f:
            f.writelines(name + "\n" for name in classes)
        if prompts:
            with open(os.path.join(self.out, "prompts.txt"), "w") as f:
                f.writelines(template + "\n" for template in prompts)
        with open(os.path.join(self.out, "skipped.log"), "w") as f:
            f.writelines(line + "\n" for line in self.skipped)
        splits = Counter(row.get("split", "every split") for row in self.rows)
        print(f"{manifest}: {len(self.rows)} samples ({', '.join(f'{s} {n}' for s, n in sorted(splits.items()))}), "
              f"{len(classes)} classes, {len(self.skipped)} files skipped"
              + (f" (reasons in {os.path.join(self.out, 'skipped.log')})" if self.skipped else ""))
        return manifest


def readable_name(name):
    """An official class name made readable for prompts: "chirping_birds" -> "chirping birds"."""
    return name.replace("_", " ")
