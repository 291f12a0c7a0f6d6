"""Real data: one JSON Lines manifest of one modality (docs/method.md section 6).

`ManifestDataset` reads a manifest and gives the items the synthetic world's datasets give
(data.SyntheticDataset): {"modality", "input", "text", "label", "anchor_image", "prior"}, the input
prepared by the modality's own preprocessing (modalities.py) from the file that readers.py reads.
A sample that cannot be used raises `SampleError`, which names the manifest, the line, the file and
the problem; `READ_ERRORS` are the exceptions a reader or a decoder raises on a bad file.
"""

import json
import struct
import warnings
import wave
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modalities import DEFAULT_SIZES, MODALITIES
from preprocess import normalize_image
from readers import read_image, read_prior


class SampleError(ValueError):
    """A sample that cannot be used; the message names the manifest, the line, the file and the problem."""


READ_ERRORS = (ValueError, OSError, EOFError, wave.Error, struct.error, zipfile.BadZipFile,
               Image.DecompressionBombError)


class ManifestDataset(torch.utils.data.Dataset):
    """One dataset = one JSON Lines manifest of ONE modality (a manifest mixing modalities is an error).

    Each line: {"modality", "path", "text" and/or "label", optional "anchor_image", "prior",
    "split"}; a line with neither text nor label is a pair only and needs an anchor image; paths are relative to the manifest's folder (or absolute). Lines are split on "\n"
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
        self.class_concepts = self.class_names  # what other datasets' classes are matched by
        self.class_index = {name: k for k, name in enumerate(self.class_names)}
        templates = MODALITIES[self.modality].prompts
        self.captions = [e["text"] or (templates[i % len(templates)].format(e["label"]) if e["label"] else None)
                         for i, e in enumerate(self.entries)]

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
        if not text and label in (None, "") and not record.get("anchor_image"):
            raise self.error(line_no, "neither 'text' nor 'label' given (a line with neither needs an 'anchor_image')")
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
