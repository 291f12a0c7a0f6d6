"""Data: the datasets a run trains and tests on, and batches that mix them (docs/method.md sections 3, 5, 6).

Top to bottom:
1. `ManifestDataset`: real data, one JSON Lines manifest of one modality (section 6);
2. `SyntheticDataset`: one modality of the synthetic world (section 5);
3. `build_datasets`: a run's datasets of one split, from its configuration;
4. `MixedBatchSampler`, `MixedDataset` and `collate`: batches that mix datasets (section 3);
5. the raw-input nearest-class-mean baseline.
Both kinds of dataset give the same items: {"modality", "input", "text", "label", "anchor_image",
"prior"}, the input prepared by the modality's own preprocessing (modalities.py).
"""

import json
import struct
import warnings
import wave
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modalities import MODALITIES, extended
from preprocess import normalize_image
from readers import read_image, read_prior
from world import World

# The input sizes of a run (train.py's defaults); modalities.py says which modality uses which.
DEFAULT_SIZES = dict(image_size=32, frames=4, audio_seconds=0.5, points=256, point_channels=3, point_groups=32,
                     point_neighbours=16, imu_length=128, eeg_channels=16, eeg_length=128, series_kernel=8, seed=0,
                     depth_format="mm")


def sizes_of(config):
    """The input sizes of a run configuration (train.py's flags); the point resampling seed is the world's."""
    return {**{k: config.get(k, DEFAULT_SIZES[k]) for k in DEFAULT_SIZES if k != "seed"},  # a run saved before a size existed
            "seed": config["world_seed"]}


# ----------------------------------------------------------------------------------------------
# 1. Real data: the manifest dataset (docs/method.md section 6)
# ----------------------------------------------------------------------------------------------

class SampleError(ValueError):
    """A sample that cannot be used; the message names the manifest, the line, the file and the problem."""


READ_ERRORS = (ValueError, OSError, EOFError, wave.Error, struct.error, zipfile.BadZipFile,
               Image.DecompressionBombError)


class ManifestDataset(torch.utils.data.Dataset):
    """One dataset = one JSON Lines manifest of ONE modality (a manifest mixing modalities is an error).

    Each line: {"modality", "path", "text" and/or "label", optional "anchor_image", "prior",
    "split"}; paths are relative to the manifest's folder (or absolute). Lines are split on "\n"
    only, and a UTF-8 byte-order mark is accepted. A label without text becomes a caption through
    the modality's prompts; `class_names` are the sorted labels and `label` indexes them (-1 when a
    line has none). Every prior embedding of a manifest has the same size, checked at open.

    Splits: with `split`, only lines carrying that split are kept. A manifest either gives every
    line a "split" or none: without any, every line belongs to every split; a manifest mixing
    lines with and without one is refused at open, so no line is dropped silently.

    on_bad="raise": the manifest is checked at open (JSON, fields, modality, files exist) and a
    file that cannot be decoded raises SampleError when it is read.
    on_bad="skip": every sample is also read once at open, so that a bad one is dropped before
    indices are handed out; skipped lines are counted in `skipped`, written with their reason to
    `bad_log` (default: next to the manifest, `<name>.skipped.log`) and announced in a warning.

    `sizes` override DEFAULT_SIZES: images, tactile, depth and video frames at `image_size`; audio
    cropped or padded to `audio_seconds`; `points` points with `point_channels` columns (3 = xyz,
    6 = xyz + rgb or normals); `frames` video frames; imu and eeg as (channels, length).
    """

    def __init__(self, path, split=None, on_bad="raise", bad_log=None, **sizes):
        if on_bad not in ("raise", "skip"):
            raise ValueError(f"on_bad must be 'raise' or 'skip', got {on_bad!r}")
        self.path, self.split, self.sizes = Path(path), split, {**DEFAULT_SIZES, **sizes}
        self.modality, self.entries, self.prior_size, bad = None, [], None, []
        records = []
        for line_no, line in enumerate(self.read_lines(), start=1):
            try:
                records.append((line_no, self.parse(line, line_no)))
            except SampleError as err:
                if on_bad == "raise":
                    raise
                bad.append(str(err))
        records = [(n, r) for n, r in records if r is not None]
        without = [n for n, r in records if "split" not in r]
        if without and len(without) < len(records):
            raise self.error(without[0], "no 'split', while other lines have one: give every line a split, or none "
                                         "(then every line belongs to every split)")
        for line_no, record in records:
            if split is not None and without == [] and record["split"] != split:
                continue
            try:
                entry = self.check_line(record, line_no)
                if on_bad == "skip":
                    self.load(entry)
            except SampleError as err:
                if on_bad == "raise":
                    raise
                bad.append(str(err))
                continue
            if entry is not None:
                self.modality = self.modality or entry["modality"]
                self.entries.append(entry)
        self.skipped, self.bad_log = len(bad), None
        if bad:
            self.bad_log = Path(bad_log) if bad_log else self.path.with_name(self.path.name + ".skipped.log")
            self.bad_log.write_text("\n".join(bad) + "\n")
            warnings.warn(f"{self.path}: skipped {len(bad)} bad samples; reasons in {self.bad_log}")
        if not self.entries:
            raise SampleError(f"{self.path}: no usable samples" + (f" with split '{split}'" if split else ""))
        self.class_names = sorted({e["label"] for e in self.entries if e["label"] is not None})
        self.class_index = {name: k for k, name in enumerate(self.class_names)}
        templates = MODALITIES[self.modality].prompts
        self.captions = [e["text"] or templates[i % len(templates)].format(e["label"]) for i, e in enumerate(self.entries)]

    @property
    def anchored(self):
        """Whether any sample carries an anchor image (which pairs this modality with image, Eq. 8)."""
        return any(e["anchor_image"] is not None for e in self.entries)

    def error(self, line_no, message, file=None):
        return SampleError(f"{self.path}: line {line_no}: " + (f"{file}: " if file else "") + message)

    def read_lines(self):
        """The manifest's lines, split on "\n" only (U+2028 may stand inside a JSON string)."""
        if not self.path.is_file():
            raise SampleError(f"{self.path}: no such manifest")
        try:
            text = self.path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise SampleError(f"{self.path}: not UTF-8 text (byte {err.start})") from None
        return [line.removesuffix("\r") for line in text.split("\n")]

    def parse(self, line, line_no):
        """A manifest line -> its JSON object, None for a blank line."""
        if not line.strip():
            return None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise self.error(line_no, f"not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise self.error(line_no, "expected a JSON object")
        return record

    def check_line(self, record, line_no):
        """A manifest line's JSON object -> entry dict with resolved paths and the paths as written."""
        modality = record.get("modality")
        if modality not in MODALITIES:
            raise self.error(line_no, f"unknown modality {modality!r}; expected one of {sorted(MODALITIES)}")
        if self.modality not in (None, modality):
            raise self.error(line_no, f"modality '{modality}' in a manifest of '{self.modality}': "
                                      "one modality per manifest")
        text, label = record.get("text"), record.get("label")
        if text is not None and not isinstance(text, str):
            raise self.error(line_no, f"'text' must be a string, got {type(text).__name__}")
        if text is not None and text and not text.strip():
            raise self.error(line_no, "'text' is only whitespace")
        if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
            raise self.error(line_no, f"'label' must be a string or a number, got {json.dumps(label)}")
        if not text and label in (None, ""):
            raise self.error(line_no, "neither 'text' nor 'label' given")
        if not record.get("path"):
            raise self.error(line_no, "no 'path' given")
        entry = {"line": line_no, "modality": modality, "text": text, "written": {},
                 "label": None if label in (None, "") else str(label)}
        for key in ("path", "anchor_image", "prior"):
            if record.get(key) is not None and not isinstance(record[key], str):
                raise self.error(line_no, f"'{key}' must be a string path, got {record[key]!r}")
            entry["written"][key] = record.get(key)
            entry[key] = None if record.get(key) is None else self.path.parent / record[key]  # an absolute path stays
            if entry[key] is not None and not entry[key].exists():
                raise self.error(line_no, f"{key} file does not exist", record[key])
        if entry["prior"] is not None:
            self.check_prior_size(entry, line_no)
        return entry

    def check_prior_size(self, entry, line_no):
        """Every prior embedding of a manifest has the size of the first one (Eq. 9 stacks them)."""
        try:
            size = np.load(entry["prior"], mmap_mode="r", allow_pickle=False).size
        except READ_ERRORS as err:
            raise self.error(line_no, f"cannot read the prior: {err}", entry["written"]["prior"]) from None
        if self.prior_size is None:
            self.prior_size = size
        elif size != self.prior_size:
            raise self.error(line_no, f"prior has {size} values, the manifest's first prior has {self.prior_size}",
                             entry["written"]["prior"])

    def load(self, entry):
        """entry -> (input, anchor image or None, prior or None); any read problem becomes a SampleError."""
        key = "path"
        try:
            spec = MODALITIES[entry["modality"]]
            x = spec.preprocess(spec.read(entry["path"], self.sizes), self.sizes)
            if not torch.isfinite(x).all():
                raise ValueError("preprocessing produced NaN or inf")
            key = "anchor_image"
            anchor = None if entry[key] is None else normalize_image(read_image(entry[key]), self.sizes["image_size"])
            key = "prior"
            prior = None if entry[key] is None else read_prior(entry[key])
        except READ_ERRORS as err:
            raise self.error(entry["line"], str(err), entry["written"][key]) from err
        return x, anchor, prior

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        entry = self.entries[i]
        x, anchor, prior = self.load(entry)
        label = entry["label"]
        return {"modality": self.modality, "input": x, "text": self.captions[i],
                "label": -1 if label is None else self.class_index[label], "anchor_image": anchor, "prior": prior}




# ----------------------------------------------------------------------------------------------
# 2. The synthetic world as datasets (docs/method.md section 5)
# ----------------------------------------------------------------------------------------------

class SyntheticDataset(torch.utils.data.Dataset):
    """`size` samples of one modality, items exactly like data.ManifestDataset's.

    Sample i depends only on (seed, modality, split, i) and the concept it is given: labels cycle
    through the concepts kept (so classes are balanced), `held_out` concepts are removed from the
    train split of the extended modalities only. Captions fill one of the modality's prompt
    templates, or for the image-text set (which pre-trains the anchor CLIP) a template of any
    modality, so that the anchor's text tower has seen every caption form. Everything is generated
    at construction, batched per concept, and kept in memory.
    """

    def __init__(self, modality, split, size, concepts=10, held_out=(), **sizes):
        generated = [m for m, spec in MODALITIES.items() if spec.generate]
        if modality not in generated:
            raise ValueError(f"the synthetic world has no modality {modality!r}; it has {generated}")
        self.sizes = {**DEFAULT_SIZES, **sizes}
        self.seed = seed = self.sizes["seed"]  # the world's seed, also the resampling seed of its point clouds
        self.world = World(concepts, seed)
        self.class_names = list(self.world.names)
        if unknown := set(held_out) - set(self.class_names):
            raise ValueError(f"held-out concepts {sorted(unknown)} are not among {self.class_names}")
        self.modality, self.split = modality, split
        spec = MODALITIES[modality]
        drop = set(held_out) if split == "train" and modality != "image" else set()
        kept = [k for k, name in enumerate(self.class_names) if name not in drop]
        if not kept:
            raise ValueError(f"every concept of the {split} split is held out")
        self.labels = [kept[i % len(kept)] for i in range(size)]
        templates = [t for s in MODALITIES.values() for t in s.prompts] if modality == "image" else spec.prompts
        self.captions = [templates[zlib.crc32(f"{seed}/{modality}/{split}/{i}".encode()) % len(templates)]
                         .format(self.class_names[k]) for i, k in enumerate(self.labels)]
        self.inputs, self.anchors = [None] * size, [None] * size
        for k in kept:
            rows = [i for i in range(size) if self.labels[i] == k]
            for start in range(0, len(rows), 128):
                chunk = rows[start:start + 128]
                raws, anchors = spec.generate(self.world, self.sizes, [self.rng(i) for i in chunk], k)
                for j, i in enumerate(chunk):
                    self.inputs[i] = spec.preprocess(raws[j], self.sizes)
                    self.anchors[i] = None if anchors is None else normalize_image(anchors[j], self.sizes["image_size"])

    @property
    def anchored(self):
        """Whether any sample carries an anchor image (which pairs this modality with image, Eq. 8)."""
        return any(a is not None for a in self.anchors)

    def rng(self, i):
        """Sample i's own random stream, independent of the dataset's size and of the other samples."""
        return np.random.default_rng([self.seed, zlib.crc32(self.modality.encode()), zlib.crc32(self.split.encode()), i])

    def raw(self, i):
        """Sample i as the raw signal a file would hold (waveform, depth in m, points, series, RGB in [0, 1])."""
        return MODALITIES[self.modality].generate(self.world, self.sizes, [self.rng(i)], self.labels[i])[0][0]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"modality": self.modality, "input": self.inputs[i], "text": self.captions[i],
                "label": self.labels[i], "anchor_image": self.anchors[i], "prior": None}




# ----------------------------------------------------------------------------------------------
# 3. A run's datasets
# ----------------------------------------------------------------------------------------------

def build_datasets(config, split, modalities=None):
    """{modality: dataset} of one split of a run: the manifests of --data, else the synthetic world.

    For the synthetic world: `modalities` of it (default: image and the run's extended modalities),
    the image-text set of the train split being the anchor's (`n_anchor` samples). A manifest
    whose modality is not in `modalities` is left out.
    """
    sizes = sizes_of(config)
    wanted = modalities or ["image", *(config.get("modalities") or extended())]
    if config.get("data"):
        sets = {}
        for path in config["data"]:
            ds = ManifestDataset(path, split=split, on_bad=config["on_bad"], **sizes)
            if ds.modality in sets:
                raise SampleError(f"{path}: a second manifest of modality '{ds.modality}'; merge them into one")
            if ds.modality in wanted:
                sets[ds.modality] = ds
        return sets
    size = {"train": config["n_train"], "test": config["n_test"]}[split]
    anchor_size = config["n_anchor"] if split == "train" else size
    return {m: SyntheticDataset(m, split, anchor_size if m == "image" else size, concepts=config["concepts"],
                                held_out=config["held_out"], **sizes) for m in wanted}


# ----------------------------------------------------------------------------------------------
# 4. Batches that mix datasets (docs/method.md section 3)
# ----------------------------------------------------------------------------------------------

class MixedBatchSampler:
    """Endless batches of (dataset_index, sample_index) pairs mixing datasets.

    Each slot of a batch picks dataset d with probability size_d^alpha / sum_e size_e^alpha; the
    sample comes from a shuffled permutation of dataset d, reshuffled each time it is used up. Every
    rank draws the same global batch of batch_size * world_size slots and keeps its own slice, so
    ranks see disjoint samples. Batch b's dataset draws depend only on (seed, b) and the k-th
    permutation of d only on (seed, d, k), so the state is the batch number: `load_state_dict`
    replays the cheap dataset draws of earlier batches to restore the per-dataset positions.
    """

    def __init__(self, sizes, batch_size, alpha=0.5, seed=0, rank=0, world_size=1):
        if not sizes or min(sizes) < 1:
            raise ValueError(f"every dataset needs at least one sample, got sizes {list(sizes)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.sizes, self.batch_size, self.alpha, self.seed = list(sizes), batch_size, alpha, seed
        self.rank, self.world_size = rank, world_size
        weights = np.asarray(self.sizes, dtype=np.float64) ** alpha
        self.probs = weights / weights.sum()
        self.batch, self.drawn, self.permutations = 0, np.zeros(len(sizes), dtype=np.int64), {}

    def dataset_draws(self, b):
        """Dataset index of every slot of global batch b."""
        rng = np.random.default_rng([self.seed, 0, b])
        return rng.choice(len(self.sizes), self.batch_size * self.world_size, p=self.probs)

    def sample_index(self, d, k):
        """The k-th draw from dataset d: position k mod size in its (k div size)-th shuffle."""
        cycle, position = divmod(int(k), self.sizes[d])
        if self.permutations.get(d, (None,))[0] != cycle:
            self.permutations[d] = (cycle, np.random.default_rng([self.seed, 1, d, cycle]).permutation(self.sizes[d]))
        return int(self.permutations[d][1][position])

    def __iter__(self):
        while True:
            global_batch = []
            for d in self.dataset_draws(self.batch):
                global_batch.append((int(d), self.sample_index(d, self.drawn[d])))
                self.drawn[d] += 1
            self.batch += 1
            yield global_batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def settings(self):
        return {"sizes": self.sizes, "batch_size": self.batch_size, "alpha": self.alpha, "seed": self.seed,
                "world_size": self.world_size}

    def state_dict(self):
        """The number of batches yielded so far, with the settings it is valid for."""
        return {"batch": self.batch, **self.settings()}

    def load_state_dict(self, state):
        """Continue at batch state['batch'] (pass the number of batches consumed when a DataLoader prefetches)."""
        if {k: state[k] for k in self.settings()} != self.settings():
            raise ValueError(f"sampler state was saved with {({k: state[k] for k in self.settings()})}, "
                             f"this sampler has {self.settings()}")
        self.batch = state["batch"]
        self.drawn = sum((np.bincount(self.dataset_draws(b), minlength=len(self.sizes)) for b in range(self.batch)),
                         np.zeros(len(self.sizes), dtype=np.int64))


class MixedDataset(torch.utils.data.Dataset):
    """Several datasets indexed by the (dataset_index, sample_index) pairs of MixedBatchSampler."""

    def __init__(self, datasets):
        self.datasets = list(datasets)
        self.sizes = [len(ds) for ds in self.datasets]

    def __len__(self):
        return sum(self.sizes)

    def __getitem__(self, pair):
        d, i = pair
        return self.datasets[d][i]


def collate(samples):
    """Sample dicts of a mixed batch -> one batch dict, inputs grouped by modality.

    `index[m]` (and `prior_index[m]`) hold the batch positions of modality m's rows, so that
    per-modality embeddings scatter back into batch order: z[index[m]] = encode(inputs[m]).
    """
    modality = [s["modality"] for s in samples]
    groups = {m: [k for k, name in enumerate(modality) if name == m] for m in dict.fromkeys(modality)}
    with_prior = {m: [k for k in rows if samples[k]["prior"] is not None] for m, rows in groups.items()}
    with_prior = {m: rows for m, rows in with_prior.items() if rows}
    anchor_mask = torch.tensor([s["anchor_image"] is not None for s in samples], dtype=torch.bool)
    return {
        "inputs": {m: torch.stack([samples[k]["input"] for k in rows]) for m, rows in groups.items()},
        "index": {m: torch.tensor(rows, dtype=torch.long) for m, rows in groups.items()},
        "modality": modality,
        "text": [s["text"] for s in samples],
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "anchor_image": torch.stack([s["anchor_image"] for s in samples if s["anchor_image"] is not None])
        if anchor_mask.any() else None,
        "anchor_mask": anchor_mask,
        "prior": {m: torch.stack([samples[k]["prior"] for k in rows]) for m, rows in with_prior.items()},
        "prior_index": {m: torch.tensor(rows, dtype=torch.long) for m, rows in with_prior.items()},
    }


# ----------------------------------------------------------------------------------------------
# 5. The raw-input baseline
# ----------------------------------------------------------------------------------------------

def nearest_class_mean_top1(train, test):
    """Raw-input baseline: test inputs (flattened) go to the nearest train class mean (Euclidean)."""
    flat = lambda ds: (torch.stack([ds[i]["input"].flatten() for i in range(len(ds))]),
                       torch.tensor([ds[i]["label"] for i in range(len(ds))]))
    (x, y), (x_test, y_test) = flat(train), flat(test)
    classes = y.unique()
    means = torch.stack([x[y == c].mean(0) for c in classes])  # (K, D)
    return (classes[torch.cdist(x_test, means).argmin(1)] == y_test).float().mean().item()
