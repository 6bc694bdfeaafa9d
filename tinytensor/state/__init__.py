"""Readers for the files weights come in. Each returns NumPy arrays that map the file's memory
(no copies where the dtype allows) with the tinytensor dtype of each, and raises CheckpointError
with the file's name and what is wrong when a file is missing, truncated or malformed."""


import sys

from tinytensor.errors import UserError


def progress(items, description: str, total: int | None = None):
    """A progress bar on stderr while big checkpoints load, shown only to a person at a terminal."""
    from tqdm import tqdm
    return tqdm(items, desc=description, total=total, unit="tensor", leave=False,
                disable=not sys.stderr.isatty())


class CheckpointError(UserError):
    """A weights file that cannot be used: the message names the file and the problem."""


def check_no_overlap(path, spans: list[tuple[int, int, str]]):
    """Tensors' byte ranges (start, end, name) must not share a byte: a file where they do is
    damaged (or made to alias one tensor as another)."""
    spans = sorted(spans)
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise CheckpointError(f"{path}: tensors {first} and {second} overlap: the file is damaged")
