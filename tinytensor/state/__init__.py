"""Readers for the files weights come in. Each returns NumPy arrays that map the file's memory
(no copies where the dtype allows) with the tinytensor dtype of each, and raises CheckpointError
with the file's name and what is wrong when a file is missing, truncated or malformed."""


import sys


def progress(items, description: str, total: int | None = None):
    """A progress bar on stderr while big checkpoints load, shown only to a person at a terminal."""
    from tqdm import tqdm
    return tqdm(items, desc=description, total=total, unit="tensor", leave=False,
                disable=not sys.stderr.isatty())


class CheckpointError(Exception):
    """A weights file that cannot be used: the message names the file and the problem."""
