"""A checkpoint folder opens only its own regular files: names in an index, symlinks and special
files cannot make the loader read elsewhere, block or fill memory (tinytensor.state.files)."""
import json
import os
import shutil
import signal

import pytest

from models.formats import checkpoint, hf as hf_format
from models.llama3.images import ImageError, open_image
from tinytensor.state import CheckpointError, files
from tools import make_checkpoint

from tests.tiny_checkpoint import CONFIG


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("originals")
    arrays = checkpoint.RandomArrays(CONFIG)
    make_checkpoint.write_hf(root / "hf", CONFIG, arrays)
    make_checkpoint.write_meta(root / "meta", CONFIG, arrays, ffn=(32, None))
    return root


@pytest.fixture
def hf(originals, tmp_path):
    shutil.copytree(originals / "hf", tmp_path / "hf")
    return tmp_path / "hf"


@pytest.fixture
def meta(originals, tmp_path):
    shutil.copytree(originals / "meta", tmp_path / "meta")
    return tmp_path / "meta"


@pytest.fixture(autouse=True)
def no_hang():
    """A FIFO opened for reading blocks until a writer comes: none will, so fail instead of hanging."""
    def hung(*_):
        raise TimeoutError("the loader blocked")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def indexed(folder, file_name):
    """folder with model.safetensors listed under `file_name` in an index."""
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": file_name}}))
    return folder


def test_an_index_naming_a_file_outside_the_folder_is_refused(hf, tmp_path):
    shutil.move(hf / "model.safetensors", tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match="leads outside the checkpoint folder"):
        checkpoint.load(indexed(hf, "../elsewhere.safetensors"))
    with pytest.raises(CheckpointError, match="leads outside the checkpoint folder"):
        checkpoint.load(indexed(hf, str(tmp_path / "elsewhere.safetensors")))


def test_a_symlink_out_of_the_folder_is_refused_and_trusted_on_request(hf, tmp_path, monkeypatch):
    (tmp_path / "template.jinja").write_text("{{ messages[0]['content'] }}")
    (hf / "chat_template.jinja").symlink_to(tmp_path / "template.jinja")
    (hf / "tokenizer.json").write_text("{}")  # any tokenizer reads the template beside it
    (hf / "tokenizer_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="chat_template.jinja: leads outside .* set TT_TRUST_LINKS=1"):
        hf_format.chat_template(hf, {})
    monkeypatch.setenv("TT_TRUST_LINKS", "1")
    assert hf_format.chat_template(hf, {}) == "{{ messages[0]['content'] }}"


def test_a_symlink_to_etc_passwd_is_never_read(hf):
    (hf / "chat_template.jinja").unlink(missing_ok=True)
    (hf / "chat_template.jinja").symlink_to("/etc/passwd")
    with pytest.raises(CheckpointError, match="leads outside"):
        hf_format.chat_template(hf, {})


def test_a_symlink_inside_the_folder_is_followed(hf):
    shutil.move(hf / "model.safetensors", hf / "weights.bin")
    (hf / "model.safetensors").symlink_to("weights.bin")
    config, _, _ = checkpoint.read(hf)
    assert config.dim == CONFIG.dim


def test_the_hugging_face_cache_layout_loads(originals, tmp_path):
    """snapshots/<revision>/NAME -> ../../blobs/<hash>, as huggingface_hub stores every file."""
    repo = tmp_path / "hub" / "models--meta-llama--Tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, source in enumerate(sorted((originals / "hf").iterdir())):
        shutil.copy(source, blobs / f"blob{i}")
        (snapshot / source.name).symlink_to(f"../../blobs/blob{i}")
    config, _, _ = checkpoint.read(snapshot)
    assert config.dim == CONFIG.dim


@pytest.mark.parametrize("name", ["params.json", "tokenizer.model", "consolidated.00.pth"])
def test_a_fifo_in_a_meta_folder_is_refused_without_blocking(meta, name):
    (meta / name).unlink(missing_ok=True)
    os.mkfifo(meta / name)
    with pytest.raises(CheckpointError, match=f"{name}: is a FIFO, not a regular file"):
        checkpoint.load(meta)


def test_a_fifo_as_generation_config_is_refused_without_blocking(hf):
    os.mkfifo(hf / "generation_config.json")
    with pytest.raises(CheckpointError, match="is a FIFO"):
        hf_format.generation_settings(hf)


def test_a_device_is_refused_even_when_links_are_trusted(hf, monkeypatch):
    monkeypatch.setenv("TT_TRUST_LINKS", "1")
    (hf / "config.json").unlink()
    (hf / "config.json").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="is a device, not a regular file"):
        checkpoint.load(hf)


def test_a_small_file_larger_than_its_bound_is_refused_unread(hf, monkeypatch):
    monkeypatch.setattr(files, "MAX_TEXT_BYTES", 1000)
    (hf / "config.json").write_text(json.dumps({**json.loads((hf / "config.json").read_text()), "pad": "x" * 2000}))
    with pytest.raises(CheckpointError, match="config.json: is larger than"):
        checkpoint.load(hf)


def test_a_deeply_nested_json_is_one_line(hf):
    (hf / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        checkpoint.load(hf)


def test_an_image_decompression_bomb_is_one_line(tmp_path):
    from PIL import Image
    Image.new("1", (20_000, 20_000)).save(tmp_path / "bomb.png")  # 400 Mpixels in ~50 KB
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    with pytest.raises(ImageError, match="bomb.png: refused: Image size"):
        open_image(tmp_path / "bomb.png")


def test_an_image_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "photo.jpg")
    with pytest.raises(ImageError, match="photo.jpg: is a FIFO"):
        open_image(tmp_path / "photo.jpg")
