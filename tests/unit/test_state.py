"""Weight-file readers: our safetensors reader and writer agree with the reference package, and
the .pth reader refuses pickles that would run code."""
import pickle
import zipfile

import numpy as np
import pytest
import safetensors.numpy
torch = pytest.importorskip("torch", reason="PyTorch is a test oracle: pip install -e '.[test]'")

from ops import dtypes
from tinytensor.state import CheckpointError, pth_file, safetensors_file

pytestmark = pytest.mark.oracle


def test_reads_what_the_reference_writes(tmp_path):
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float16)}
    safetensors.numpy.save_file(arrays, tmp_path / "x.safetensors")
    got = safetensors_file.read(tmp_path / "x.safetensors")
    for name, array in arrays.items():
        np.testing.assert_array_equal(got[name][0], array)
    assert got["b"][1] == dtypes.float16


def test_reference_reads_what_we_write(tmp_path):
    arrays = {"w": (np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), dtypes.float32)}
    safetensors_file.write(tmp_path / "y.safetensors", arrays)
    np.testing.assert_array_equal(safetensors.numpy.load_file(tmp_path / "y.safetensors")["w"], arrays["w"][0])


def test_bfloat16_round_trips_through_torch(tmp_path):
    import safetensors.torch
    values = torch.randn(3, 5).to(torch.bfloat16)
    safetensors.torch.save_file({"w": values}, tmp_path / "z.safetensors")
    array, dtype = safetensors_file.read(tmp_path / "z.safetensors")["w"]
    assert dtype == dtypes.bfloat16
    np.testing.assert_array_equal(dtypes.widen(array, dtype), values.float().numpy())


def test_pth_reads_torch_save_without_torch(tmp_path):
    state = {"x": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(), "y": torch.ones(4, dtype=torch.bfloat16)}
    torch.save(state, tmp_path / "s.pth")
    got = pth_file.read(tmp_path / "s.pth")
    np.testing.assert_array_equal(got["x"][0], state["x"].numpy())  # strides kept: a transposed view
    assert got["y"][1] == dtypes.bfloat16 and dtypes.widen(np.array(got["y"][0]), dtypes.bfloat16).tolist() == [1.0] * 4


class Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned",))


def test_pth_refuses_a_pickle_that_runs_code(tmp_path):
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(CheckpointError, match="refuses to load .*system"):
        pth_file.read(path)


# ---- hostile pickles: opcodes that would change objects after they were checked -----------------

def _unicode(text: str) -> bytes:
    return pickle.BINUNICODE + len(text).to_bytes(4, "little") + text.encode()


def _set_attribute(name: str, value: bytes) -> bytes:
    """Opcodes that BUILD {name: value} onto the object on top of the stack."""
    return pickle.EMPTY_DICT + _unicode(name) + value + pickle.SETITEM + pickle.BUILD


def _spliced(path, after: bytes, insert: bytes, arg=None):
    """A copy of a torch.save zip whose data.pkl has `insert` after the first opcode `after`
    (with argument `arg`, when given)."""
    import pickletools
    with zipfile.ZipFile(path) as z:
        members = {info.filename: z.read(info) for info in z.infolist()}
    name = next(n for n in members if n.endswith("/data.pkl"))
    data = members[name]
    ops = list(pickletools.genops(data))
    at = next(i for i, (op, value, _) in enumerate(ops)
              if op.code.encode("latin-1") == after and (arg is None or value == arg))
    end = ops[at + 1][2]  # where the next opcode starts
    members[name] = data[:end] + insert + data[end:]
    hostile = path.with_name("hostile.pth")
    with zipfile.ZipFile(hostile, "w") as z:
        for member, content in members.items():
            z.writestr(member, content)
    return hostile


@pytest.fixture
def saved(tmp_path):
    torch.save({"w": torch.ones(8, dtype=torch.bfloat16)}, tmp_path / "s.pth")
    return tmp_path / "s.pth"


def test_pth_refuses_retyping_a_storage_after_its_size_was_checked(saved):
    # persistent_load checked 8 bfloat16 values fit; as int64 they would read 48 bytes past the end
    retype = _set_attribute("dtype", pickle.GLOBAL + b"torch\nLongStorage\n")
    with pytest.raises(CheckpointError, match="BUILD on a _Storage"):
        pth_file.read(_spliced(saved, pickle.BINPERSID, retype))


def test_pth_cannot_rename_a_shared_dtype(saved):
    rename = _set_attribute("name", _unicode("float32"))
    with pytest.raises(CheckpointError, match="BUILD on a DType"):
        pth_file.read(_spliced(saved, pickle.GLOBAL, rename, arg="torch BFloat16Storage"))
    assert dtypes.bfloat16.name == "bfloat16"
    with pytest.raises(AttributeError):  # no __dict__ a pickle (or anyone) could write into
        dtypes.bfloat16.__dict__


def test_pth_keeps_a_state_dicts_metadata_build(tmp_path):
    """torch.save(model.state_dict()) pickles an OrderedDict with a _metadata attribute (a BUILD)."""
    state = torch.nn.Linear(3, 2).state_dict()
    assert hasattr(state, "_metadata")
    torch.save(state, tmp_path / "sd.pth")
    got = pth_file.read(tmp_path / "sd.pth")
    np.testing.assert_array_equal(got["weight"][0], state["weight"].numpy())


@pytest.mark.parametrize("opcode", [pickle.INST + b"collections\nOrderedDict\n",
                                    pickle.MARK + pickle.GLOBAL + b"collections\nOrderedDict\n" + pickle.OBJ,
                                    pickle.GLOBAL + b"collections\nOrderedDict\n" + pickle.EMPTY_TUPLE + pickle.NEWOBJ,
                                    pickle.EXT1 + b"\x01", pickle.EXT2 + b"\x01\x00", pickle.EXT4 + b"\x01\x00\x00\x00"])
def test_pth_refuses_the_opcodes_that_construct_objects(saved, opcode):
    with pytest.raises(CheckpointError, match="opcode: a state dict of tensors has none"):
        pth_file.read(_spliced(saved, pickle.PROTO, opcode))


def test_pth_refuses_appending_or_setting_items_on_anything_but_plain_containers(saved):
    with pytest.raises(CheckpointError, match="an item set on a _Storage"):
        pth_file.read(_spliced(saved, pickle.BINPERSID, _unicode("k") + _unicode("v") + pickle.SETITEM))
    with pytest.raises(CheckpointError, match="an append on a _Storage"):
        pth_file.read(_spliced(saved, pickle.BINPERSID, pickle.MARK + _unicode("v") + pickle.APPENDS))


def test_pth_refuses_a_data_pkl_that_inflates_past_the_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(pth_file, "MAX_PICKLE_BYTES", 1 << 20)
    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("bomb/data.pkl", b"(" * (2 << 20))  # 2 MiB of MARK deflates to ~2 KB
    assert path.stat().st_size < 10_000
    with pytest.raises(CheckpointError, match="more than 1 MiB of records"):
        pth_file.read(path)
