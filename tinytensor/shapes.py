"""Shape rules the Tensor layer resolves before recording an op."""


def shape_arg(args) -> tuple[int, ...]:
    """Accept f(2, 3) and f((2, 3)) alike."""
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = args[0]
    return tuple(int(a) for a in args)


def broadcast_shape(*shapes) -> tuple[int, ...]:
    ndim = max(len(s) for s in shapes)
    padded = [(1,) * (ndim - len(s)) + tuple(s) for s in shapes]
    out = []
    for sizes in zip(*padded):
        sizes_not_1 = {n for n in sizes if n != 1}
        if len(sizes_not_1) > 1:
            raise ValueError(f"shapes {' and '.join(map(str, map(tuple, shapes)))} do not broadcast")
        out.append(sizes_not_1.pop() if sizes_not_1 else 1)
    return tuple(out)
