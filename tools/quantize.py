"""Write a checkpoint as a GGUF file of a llama.cpp file type, tensor by tensor:

    python -m tools.quantize ~/models/Llama-3.2-1B-Instruct 1b-Q4_K_M.gguf --type q4_k_m
    python -m tools.quantize ~/.llama/checkpoints/Llama3.2-1B 1b-Q8_0.gguf --type q8_0
    python -m tools.quantize model-f16.gguf model-Q4_0.gguf --type q4_0

The source is a Hugging Face folder, a Meta folder or a GGUF file. Each weight is read from the
memory-mapped source, converted a few thousand rows at a time and written, so the peak memory is
about one tensor. The types per tensor are llama-quantize's for the same file type (see
models/formats/quant_mix.py; --pure gives every matrix the one type); the file has llama.cpp's layout,
with the tokenizer and chat template, and loads in llama.cpp. Requantising weights that are
already quantised to another type loses accuracy twice: as llama-quantize, it asks for
--allow-requantize. An existing output file is never overwritten: the file is written under a fresh temporary name
beside it and takes its name only once complete; on any failure (a full disk, Ctrl-C) nothing of
the user's has changed.
"""
import sys
import time
from collections import Counter
from pathlib import Path

from models.formats import checkpoint, quant_mix
from models.formats.gguf_writer import write_gguf
from models.generation.cli import OneLineParser


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m tools.quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="a Hugging Face folder, a Meta folder or a .gguf file")
    p.add_argument("out", type=Path, help="the .gguf file to write (never overwritten)")
    p.add_argument("--type", required=True, type=str.lower, choices=list(quant_mix.FILE_TYPES),
                   metavar="TYPE", help=f"the file type, as llama-quantize names it: "
                                        f"{', '.join(quant_mix.FILE_TYPES)}")
    p.add_argument("--pure", action="store_true", help="every matrix in the type's base type (no Q6_K head, "
                                                       "no mixes), as llama-quantize --pure")
    p.add_argument("--allow-requantize", action="store_true",
                   help="allow quantising weights that are already quantised to another type")
    args = p.parse_args(argv)
    from tinytensor.errors import UserError

    try:
        if args.out.exists() or args.out.is_symlink():
            raise ValueError(f"{args.out} exists; choose a new path (nothing was overwritten)")
        if args.out.suffix != ".gguf":
            raise ValueError(f"{args.out}: give the output a .gguf name")
        if not args.out.parent.is_dir():
            raise ValueError(f"{args.out.parent}: no such folder")
        start = time.perf_counter()
        config, arrays, tokenizer = checkpoint.read(args.source)
        if tokenizer is None:
            raise ValueError(f"{args.source}: has no tokenizer (tokenizer.model or tokenizer.json) to write "
                             f"into the GGUF file")
        file_type = quant_mix.FILE_TYPES[args.type]
        if args.pure:
            file_type = quant_mix.pure(file_type.base)
        requantised = requantised_names(config, arrays, file_type)
        if requantised and not args.allow_requantize:
            raise ValueError(f"{args.source}: {len(requantised)} weights (e.g. {requantised[0]}) are already "
                             f"quantised; requantising loses accuracy twice: give --allow-requantize to do it")
        types = write_gguf(args.out, config, arrays, tokenizer, file_type, inputs=[args.source])
    except (UserError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = Counter(t.name for t in types.values())
    size = args.out.stat().st_size
    print(f"{args.out}: {file_type.name}{' (pure)' if file_type.pure else ''}, {len(types)} tensors "
          f"({', '.join(f'{n} {name}' for name, n in counts.most_common())}), {size / 1e6:.1f} MB "
          f"in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def requantised_names(config, arrays: dict, file_type) -> list[str]:
    """The weights stored in a block type that this file type would turn into another type."""
    shapes = checkpoint.expected_shapes(config)
    return [name for name, (_, dt) in arrays.items()
            if dt.block and file_type.tensor_type(name, shapes[name], config) != dt]


if __name__ == "__main__":
    sys.exit(main())
