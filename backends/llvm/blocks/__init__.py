"""Block-quantised weights in the llvm kernels: each format of ops/blocks/ has its reads here
(reads.py says what the kernels ask of one), and dot.py the integer dot products they all meet.
quantised.py and column_lanes.py, the product kernels, reach a format only through `reads`."""
from backends.llvm.blocks.k_quants import KQuantReads
from backends.llvm.blocks.q6_k import Q6KReads
from backends.llvm.blocks.reads import Reads
from backends.llvm.blocks.simple import SimpleReads
from ops.blocks import Format, KQuant, Q6K, Simple

READS = {Simple: SimpleReads, KQuant: KQuantReads, Q6K: Q6KReads}  # a format's class -> its reads


def reads(f: Format) -> Reads:
    return READS[type(f)](f)
