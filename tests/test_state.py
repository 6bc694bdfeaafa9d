"""Weight-file readers: our safetensors reader and writer agree with the reference package, and
the .pth reader refuses pickles that would run code."""
import pickle
import zipfile

import numpy as np
import pytest
import safetensors.numpy
import torch

from ops import dtypes
from tinytensor.state import CheckpointError, pth_file, safetensors_file


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
