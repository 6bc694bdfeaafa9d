"""Readers for the files weights come in. Each returns NumPy arrays that map the file's memory
(no copies where the dtype allows) with the tinytensor dtype of each, and raises CheckpointError
with the file's name and what is wrong when a file is missing, truncated or malformed."""


class CheckpointError(Exception):
    """A weights file that cannot be used: the message names the file and the problem."""
