"""tinytensor.state.files.new_file: what a tool writes appears whole or not at all, never over an
input, and with replace=False never over anything."""
import subprocess
import sys
import textwrap

import pytest

from tinytensor.state import files


def test_a_failure_while_writing_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("earlier results")
    with pytest.raises(RuntimeError):
        with files.new_file(target, replace=True) as partial:
            partial.write_text("half of the new")
            raise RuntimeError("the run failed")
    assert target.read_text() == "earlier results" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_success_replaces_when_asked_and_never_otherwise(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    with files.new_file(target, replace=True) as partial:
        partial.write_text("new")
    assert target.read_text() == "new"
    with pytest.raises(FileExistsError, match="nothing was overwritten"):
        with files.new_file(target) as partial:
            partial.write_text("newer")
    assert target.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_a_file_that_appears_while_writing_is_not_overwritten(tmp_path):
    target = tmp_path / "out.gguf"
    with pytest.raises(FileExistsError):
        with files.new_file(target) as partial:
            partial.write_text("ours")
            target.write_text("someone else's")
    assert target.read_text() == "someone else's" and len(list(tmp_path.iterdir())) == 1


def test_an_input_is_never_the_output(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "questions.csv").write_text("q,a\n")
    (tmp_path / "alias.csv").hardlink_to(data / "questions.csv")
    for output in (data / "questions.csv", tmp_path / "alias.csv"):
        with pytest.raises(ValueError, match="is also an input"):
            with files.new_file(output, inputs=[data], replace=True):
                pass
    assert (data / "questions.csv").read_text() == "q,a\n"


def test_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path):
    """RLIMIT_FSIZE makes a write fail as a full disk does (EFBIG; Python ignores SIGXFSZ)."""
    target = tmp_path / "results.json"
    target.write_text("earlier results")
    script = textwrap.dedent(f"""
        import resource
        from tinytensor.state import files
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        with files.new_file({str(target)!r}, replace=True) as partial:
            with open(partial, "w") as f:
                f.write("x" * 100_000)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode != 0 and "File too large" in done.stderr
    assert target.read_text() == "earlier results" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
