"""Prefill products on 4-bit blocks with 8 weight rows (8 columns of C) in the 8 lanes of one
vector, as llama.cpp's repacked kernels hold them, but transposed in registers from the file's
own layout rather than repacked at load (no second copy of the weights).

block_sums (quantised.py) gives each (row, column) pair its own 8-lane integer dot product and
then 3 float operations per block; with 16 pairs per step the float work is most of it. Here
the 8 columns' blocks are transposed once per step into 8 vectors (lane c: 4 values of column
c), each met by one 4-byte group of an x row broadcast to all lanes, so one row's block costs 8
integer dot products and 4 float operations for all 8 columns, and no horizontal sums.

The weights' 4-bit values go in unsigned (0..15, the offset and minimum apart): for a value
d * u - o * d + m and x's q8 block (d_x, q, s_x = d_x * sum q),
    sum_k x_k w_k = d * d_x * sum_k q_k u_k + (m - o * d) * s_x,
and the stored activation bytes are q + 128, so the integer sum starts at -128 * sum_k u_k.
"""
from backends.llvm.blocks import LANES, SUMS, dot_add
from backends.llvm.emitter import constant
from ops import dtypes
from ops.blocks import BLOCK

F16, F32 = dtypes.float16, dtypes.float32
FORMATS = ("q4_0", "q4_1")  # 16 bytes of nibbles: byte j holds values j and j + 16
COLUMNS = LANES
BYTES = f"<{BLOCK} x i8>"
FLOATS = f"<{LANES} x float>"


def reads(w_types) -> bool:
    """Whether every weight is in a format these kernels read."""
    return all(t.block is not None and t.block.name in FORMATS for t in w_types)


def column_lane_sums(k, w_types, rows, cols, target=None):
    """{(weight, row, c): sum_k x[row, k] * W[c, k]} for the 8 weight rows at byte offsets
    cols[weight] (x's q8 blocks in the kernel's A, AD, AS)."""
    formats = [t.block for t in w_types]
    blocks = k.op(f"lshr i64 %K, {BLOCK.bit_length() - 1}")
    with k.loop("0", blocks, hint="block") as b:
        acc = {(i, r): k.carry("zeroinitializer", FLOATS) for i in range(len(formats)) for r in range(len(rows))}
        at = [k.add(k.mul(row, blocks), b) for row in rows]
        groups = [_groups(k, k.at("%A", k.add(k.mul(row, "%K"), k.mul(b, BLOCK)), "i8")) for row in rows]
        d_x = [k.splat(k.load_at("%AD", x, F32), LANES) for x in at]
        s_x = [k.splat(k.load_at("%AS", x, F32), LANES) for x in at]
        for i, f in enumerate(formats):
            where = [k.at(f"%W{i}", k.add(col, k.mul(b, f.block_bytes)), "i8") for col in cols[i]]
            parts, d, offset_term, bias = _columns(k, f, where, target)
            for r in range(len(rows)):
                chains = [bias, "zeroinitializer"]  # two dependency chains per row
                for g, part in enumerate(parts):
                    chains[g % 2] = dot_add(k, chains[g % 2], groups[r][g], part, target)
                total = k.op(f"sitofp {SUMS} {k.op(f'add {SUMS} {chains[0]}, {chains[1]}')} to {FLOATS}")
                term = k.op(f"fmul contract {FLOATS} {k.op(f'fmul {FLOATS} {total}, {d}')}, {d_x[r]}")
                value = k.op(f"fadd reassoc contract {FLOATS} {acc[i, r].current}, {term}")
                term = k.op(f"fmul contract {FLOATS} {offset_term}, {s_x[r]}")
                acc[i, r].set(k.op(f"fadd reassoc contract {FLOATS} {value}, {term}"))
    return {(i, r, c): k.op(f"extractelement {FLOATS} {acc[i, r].final}, i32 {c}")
            for i in range(len(formats)) for r in range(len(rows)) for c in range(COLUMNS)}


def _groups(k, at: str) -> list[str]:
    """x's block at `at` as 8 vectors, vector g holding bytes 4g..4g+3 in every lane."""
    out = []
    for g in range(BLOCK // 4):
        word = k.op(f"load i32, ptr {k.at(at, 4 * g, 'i8')}, align 1")
        out.append(k.op(f"bitcast {SUMS} {k.splat(word, LANES, 'i32')} to {BYTES}"))
    return out


def _columns(k, f, where: list[str], target):
    """The blocks at the 8 addresses `where` as (parts, d, offset term, bias): parts[g] holds in
    lane c column c's values 4g..4g+3 (0..15, offsets apart); d the 8 scales; m - o * d per
    lane; -128 times each lane's sum of values, the integer sums' starting point."""
    words = [k.op(f"bitcast <16 x i8> {k.vload(k.at(w, f.quants_at, 'i8'), 16, 'i8')} to <4 x i32>") for w in where]
    pairs = [k.concat(words[c], words[c + 1], 4, "i32") for c in range(0, COLUMNS, 2)]
    quads = [k.concat(pairs[c], pairs[c + 1], 8, "i32") for c in range(0, len(pairs), 2)]
    every = k.concat(quads[0], quads[1], 16, "i32")  # column c's 4 words at 4c..4c+3
    low, high = [], []
    for g in range(4):  # byte j of a column: value j (low nibble), value j + 16 (high)
        lanes = ", ".join(f"i32 {4 * c + g}" for c in range(COLUMNS))
        packed = k.op(f"bitcast {SUMS} {k.op(f'shufflevector <32 x i32> {every}, <32 x i32> poison, <8 x i32> <{lanes}>')} to {BYTES}")
        low.append(k.op(f"and {BYTES} {packed}, {constant(15, BLOCK)}"))
        high.append(k.op(f"and {BYTES} {k.op(f'lshr {BYTES} {packed}, {constant(4, BLOCK)}')}, {constant(15, BLOCK)}"))
    parts = low + high
    total = parts[0]
    for part in parts[1:]:  # at most 8 * 15 per byte
        total = k.op(f"add {BYTES} {total}, {part}")
    bias = k.op(f"sub {SUMS} zeroinitializer, {dot_add(k, 'zeroinitializer', constant(-128, BLOCK), total, target)}")
    d = _lanes(k, [k.load(w, F16) for w in where])
    if f.has_min:
        offset_term = _lanes(k, [k.load(k.at(w, 2, "i8"), F16) for w in where])
    else:  # - o * d, exact (o a power of two)
        offset_term = k.op(f"fmul {FLOATS} {d}, {k.splat(f'{-float(f.offset)!r}', LANES)}")
    return parts, d, offset_term, bias


def _lanes(k, values: list[str]) -> str:
    """An <8 x float> of 8 floats."""
    v = "poison"
    for c, x in enumerate(values):
        v = k.op(f"insertelement {FLOATS} {v}, float {x}, i32 {c}")
    return v
