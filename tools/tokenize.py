"""Print the token ids of TEXT for a checkpoint's tokenizer, as one JSON list (like llama.cpp's
llama-tokenize):

    python -m tools.tokenize PATH TEXT

PATH is a checkpoint folder (Hugging Face or Meta), a .gguf file, or a Llama 3 tokenizer.model.
"""
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m tools.tokenize PATH TEXT", file=sys.stderr)
        return 2
    from models.checkpoint import load_tokenizer
    from models.tokenizer import TokenizerError
    from tinytensor.state import CheckpointError
    try:
        tokenizer = load_tokenizer(Path(argv[0]))
    except (CheckpointError, TokenizerError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(tokenizer.encode(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
