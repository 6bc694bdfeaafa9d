"""Print the token ids of TEXT for a checkpoint's tokenizer, as one JSON list (like llama.cpp's
llama-tokenize):

    python -m tools.tokenize PATH TEXT

PATH is a checkpoint folder (Hugging Face or Meta), a .gguf file, or a Llama 3 tokenizer.model.
"""
import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.tokenize", description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path, help="a checkpoint folder, a .gguf file or a Llama 3 tokenizer.model")
    p.add_argument("text", help="the text to tokenize (no BOS is added unless the tokenizer always adds one)")
    args = p.parse_args(argv)
    from models.formats.checkpoint import load_tokenizer
    from tinytensor.errors import UserError
    try:
        tokenizer = load_tokenizer(args.path)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(tokenizer.encode(args.text)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
