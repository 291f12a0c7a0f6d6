"""The exercises' stored cases (assignments/expected.json, written by assignments/expected.py from the
solution): `stored("attention")` gives that exercise's inputs and outputs, lists of numbers turned into
float32 tensors (of integers into long tensors), scalars and lists of strings as they are."""

import json
from pathlib import Path

import pytest
import torch

EXPECTED = Path(__file__).resolve().parents[2] / "assignments" / "expected.json"


def as_tensor(value):
    if not isinstance(value, list):
        return value
    try:
        return torch.tensor(value)
    except (TypeError, ValueError):  # not numbers
        return value


@pytest.fixture(scope="session")
def stored():
    cases = json.loads(EXPECTED.read_text(encoding="utf-8"))
    return lambda name: {key: as_tensor(value) for key, value in cases[name].items()}
