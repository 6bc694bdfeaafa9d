"""What the product kernels ask of a block format: its (sub-)blocks in registers, for
quantised.block_sums (one weight row at a time, `group` then `block`), and its blocks with one
weight row per vector lane, for column_lanes (`lanes_group` then `lanes_block`). One subclass
per format family (simple.py, k_quants.py, q6_k.py), reading the byte offsets its ops/blocks/
object names; the kernels call these and never test a format's name."""
from dataclasses import dataclass

from backends.llvm.blocks.dot import LANES, Block
from backends.llvm.blocks.lanes import LaneBlock, Lanes


@dataclass
class Group:
    """What the sub-blocks of one block share, read once per block (a K-quant's super-block)."""
    at: str                     # its address
    scales: str | None = None   # float vectors of its sub-blocks' scales
    minimums: str | None = None  # <8 x float>: each sub-block's minimum, added once per group


class Reads:
    lanes = True         # whether column_lanes reads it
    scratch = 0          # lane vectors of scales a column_lanes step keeps per weight
    block_minimum = False  # whether Block.m holds a minimum, one float per block
    integer = False      # whether lanes_block gives integer scales where Lanes.integer says so

    def __init__(self, f):
        self.f = f

    def group(self, k, at: str) -> Group:
        """The shared part of the block at `at`."""
        return Group(at)

    def block(self, k, group: Group, sub: int) -> Block:
        """Sub-block `sub` (known when the kernel is built) of the group's block."""
        raise NotImplementedError

    def lanes_group(self, v: Lanes, where: list[str], scratch: str | None):
        """Once per step, the columns' blocks at `where`: what their sub-blocks share, into
        `scratch` (column_lanes.scratch)."""

    def lanes_block(self, v: Lanes, where: list[str], scratch: str | None, s: str, j: str, e: int) -> LaneBlock:
        """The columns' 32 values for x's block s of the step (s = 2j + e: j known when the
        kernel runs, e when it is built)."""
        raise NotImplementedError

    def lanes_step(self, v: Lanes, scratch: str | None) -> tuple[str, list[str] | None]:
        """With integer scales, what multiplies the step's integer sums (each column's d) and
        the terms per unit of s_x of x's blocks in the step (as LaneBlock.offset), if any."""
        raise NotImplementedError


def field(k, at: str, offset: int) -> str:
    """The address of the field `offset` bytes into the block at `at`."""
    return at if offset == 0 else k.at(at, offset, "i8")


def lanes_of(k, v: str, n: int, picks: list[int]) -> str:
    """<8 x float> of the given lanes of an <n x float>."""
    return k.op(f"shufflevector <{n} x float> {v}, <{n} x float> poison, <{LANES} x i32> "
                f"<{', '.join(f'i32 {x}' for x in picks)}>")
