"""Opening the files a checkpoint names, one checked way: a hostile or damaged folder must not
make us read outside it, block on a FIFO or a device, or fill memory with an endless file.

- A name is resolved (symlinks followed) and must stay inside the checkpoint folder. The Hugging
  Face cache keeps a snapshot's files as links to `../../blobs/`: a folder under
  `models--*/snapshots/` may also reach that repository's `blobs/`. Anything else needs the user's
  word: TT_TRUST_LINKS=1.
- Only regular files are opened (a FIFO would block the open, /dev/zero never ends).
- Small files (JSON, templates, tokenizers) are read within a size bound, checked before reading
  and again on the bytes read (a file can grow between the two).

And writing what a tool makes (new_file): under a fresh temporary name, renamed into place only
once whole, so that no failure (a full disk, Ctrl-C) leaves a user's file damaged or replaced.
"""
import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path

from tinytensor.state import CheckpointError

MAX_TEXT_BYTES = 64 << 20  # the largest real one, a 128k-token tokenizer.json, is ~9 MB
TRUST_LINKS = "TT_TRUST_LINKS"


def _roots(folder: Path) -> list[Path]:
    """Where a checkpoint folder's links may lead: itself, and for a Hugging Face cache snapshot
    its repository's blobs."""
    roots = [folder]
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        roots.append(folder.parent.parent / "blobs")
    return roots


def inside(folder: Path, name: str | Path) -> Path:
    """folder/name with every link resolved, refused unless it stays in the checkpoint (or the
    user trusts links: TT_TRUST_LINKS=1)."""
    folder = Path(folder).resolve()
    path = (folder / name).resolve()
    if os.environ.get(TRUST_LINKS) == "1" or any(path.is_relative_to(root) for root in _roots(folder)):
        return path
    raise CheckpointError(f"{folder / name}: leads outside the checkpoint folder {folder} (to {path}): refused; "
                          f"if you trust this checkpoint's links, set {TRUST_LINKS}=1")


def regular(path: Path) -> Path:
    """path, when it is a regular file (following links); a FIFO, device, socket or folder is
    refused before anything opens it."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else \
            "not a file"
        raise CheckpointError(f"{path}: is {kind}, not a regular file")
    return path


def read_bytes(path: Path, limit: int | None = None) -> bytes:
    """A small file's bytes: a regular file of at most `limit` bytes. The open does not block
    (O_NONBLOCK), so a FIFO swapped in after the check cannot hang it either."""
    path, limit = Path(path), MAX_TEXT_BYTES if limit is None else limit
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            regular(path)  # says what it is
            raise CheckpointError(f"{path}: is not a regular file")
        too_big = CheckpointError(f"{path}: is larger than {limit >> 20} MiB, far more than such a file holds: "
                                  f"it is damaged or not what its name says")
        if info.st_size > limit:
            raise too_big
        data = f.read(limit + 1)
    if len(data) > limit:
        raise too_big
    return data


def read_json(folder: Path, name: str):
    """A JSON file of the checkpoint folder: inside it, regular, bounded, parsed."""
    path = inside(folder, name)
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{Path(folder) / name}: not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{Path(folder) / name}: not valid JSON (nested too deeply)") from None


def read_text(path: Path, limit: int | None = None) -> str:
    """A small UTF-8 file's text, read as read_bytes reads it."""
    try:
        return read_bytes(path, limit).decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: is not UTF-8 text ({e.reason} at byte {e.start})") from None


def refuse_inputs(path: Path, inputs) -> None:
    """ValueError when `path` is one of `inputs` (files, or folders meaning every file in them),
    by name or as the same file under another name."""
    path = Path(path)
    if not path.exists():
        return  # a name that holds nothing yet is no input
    for source in map(Path, inputs):
        for f in (p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]:
            if f.exists() and os.path.samefile(f, path):  # by any name: links and hard links too
                raise ValueError(f"{path}: is also an input ({f}): give the output a new name")


@contextlib.contextmanager
def new_file(path: Path, inputs=(), replace: bool = False):
    """Write `path` only once it is whole: yields a fresh temporary name in the same folder (never
    a fixed one, which could be a user's file or a link planted there) to write to; on success
    the file is flushed to disk and takes the name, on any failure it is removed. Whatever was at
    `path` is untouched until then, and with replace=False it is never overwritten (FileExistsError,
    even when it appears while writing). `inputs`: files or folders being read: writing onto one
    is refused."""
    path = Path(path)
    refuse_inputs(path, inputs)
    if not replace and (path.exists() or path.is_symlink()):
        raise FileExistsError(f"{path} exists; choose a new path (nothing was overwritten)")
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    try:
        yield Path(temporary)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)  # fails if path appeared meanwhile: link does not overwrite
            os.unlink(temporary)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the new name itself on disk
        finally:
            os.close(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
