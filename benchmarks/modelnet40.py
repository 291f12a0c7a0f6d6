"""ModelNet40 (Wu et al., 2015) -> train and test manifests of point clouds, 40 classes.

Official layout (`modelnet40_normal_resampled`): ROOT/modelnet40_shape_names.txt (the 40 class
names, in label order), ROOT/modelnet40_train.txt and ROOT/modelnet40_test.txt (one shape id a
line, like airplane_0627; the test list has 2,468 shapes), and ROOT/<class>/<id>.txt with
comma-separated x,y,z,nx,ny,nz rows. The class of an id is the id without its trailing number.
Points keep every column; `--normals` checks that each file has the 6 channels and says the
train.py / eval.py flag that keeps them (`--point-channels 6`), as settings.txt records.
prompts.txt holds templates of this project's choosing (no set is fixed across the literature).

  python benchmarks/modelnet40.py modelnet40_normal_resampled --out data/modelnet40
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import Writer, readable_name, refuse, require  # noqa: E402

PROMPTS = ["a point cloud of a {}.", "a 3D model of a {}.", "a 3D scan of a {}."]


def columns_of(path):
    """The number of comma-separated values on the file's first line, or None when it has none."""
    with open(path) as f:
        first = f.readline().strip()
    return len(first.split(",")) if first else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="the modelnet40_normal_resampled folder as downloaded")
    p.add_argument("--out", required=True, help="folder for modelnet40.jsonl, classes.txt, prompts.txt, skipped.log")
    p.add_argument("--normals", action="store_true", help="keep x,y,z,nx,ny,nz (6 channels) instead of x,y,z")
    args = p.parse_args(argv)
    names_file = require(os.path.join(args.root, "modelnet40_shape_names.txt"), "the class list modelnet40_shape_names.txt")
    classes = [line.strip() for line in open(names_file) if line.strip()]
    writer = Writer(args.out, "modelnet40")
    channels = 6 if args.normals else 3
    for split in ("train", "test"):
        ids = [line.strip() for line in open(require(os.path.join(args.root, f"modelnet40_{split}.txt"),
                                                      f"the {split} list modelnet40_{split}.txt")) if line.strip()]
        for shape_id in ids:
            name = shape_id.rsplit("_", 1)[0]
            path = os.path.join(args.root, name, f"{shape_id}.txt")
            if name not in classes:
                writer.skip(path, f"class '{name}' is not in modelnet40_shape_names.txt")
            elif not os.path.exists(path):
                writer.skip(path, "file is missing")
            elif (n := columns_of(path)) is None or n < channels:
                writer.skip(path, f"{n or 0} values a row, {channels} needed")
            else:
                writer.add("point", path, readable_name(name), split)
    if not writer.rows:
        refuse(f"no shape of the lists was found under {args.root}/<class>/<id>.txt")
    with open(os.path.join(args.out, "settings.txt"), "w") as f:
        f.write(f"--point-channels {channels}\n")
    writer.finish([readable_name(c) for c in classes], PROMPTS)
    print(f"train and evaluate with --point-channels {channels}")


if __name__ == "__main__":
    main()
