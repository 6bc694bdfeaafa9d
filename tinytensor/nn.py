"""Neural-network functions, composed from Tensor ops (the fusion passes find them again in the
graph). Half-precision inputs are computed in float32 and rounded once at the end, as PyTorch
does inside its kernels."""
import math

from ops import dtypes
from tinytensor.tensor import Tensor


def _f32(x: Tensor) -> Tensor:
    return x.cast(dtypes.float32) if x.dtype.is_float else x.cast(dtypes.default_float)


def softmax(x: Tensor, axis=-1) -> Tensor:
    x32 = _f32(x)
    e = (x32 - x32.max(axis, keepdim=True)).exp()
    return (e / e.sum(axis, keepdim=True)).cast(x.dtype if x.dtype.is_float else dtypes.float32)


def log_softmax(x: Tensor, axis=-1) -> Tensor:
    x32 = _f32(x)
    shifted = x32 - x32.max(axis, keepdim=True)
    out = shifted - shifted.exp().sum(axis, keepdim=True).log()
    return out.cast(x.dtype if x.dtype.is_float else dtypes.float32)


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """x / sqrt(mean(x^2) + eps) over the last axis, times weight; as Meta's RMSNorm: normalise
    in float32, round to x's dtype, then scale."""
    x32 = _f32(x)
    normed = (x32 * ((x32 * x32).mean(-1, keepdim=True) + eps).rsqrt()).cast(x.dtype)
    return normed if weight is None else normed * weight


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the last axis (the biased variance), times weight plus
    bias: PyTorch's LayerNorm, computed in float32."""
    x32 = _f32(x)
    centred = x32 - x32.mean(-1, keepdim=True)
    out = centred * ((centred * centred).mean(-1, keepdim=True) + eps).rsqrt()
    out = out if weight is None else out * weight
    return (out if bias is None else out + bias).cast(x.dtype)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T (+ bias), with weight stored [out_features, in_features] as in PyTorch."""
    out = x @ weight.transpose(-1, -2)
    return out if bias is None else out + bias


def embedding(ids: Tensor, weight: Tensor) -> Tensor:
    """Rows of weight [vocab, dim] picked by integer ids of any shape -> [*ids.shape, dim]."""
    return weight[ids]


def rotary_embedding(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Llama's rotary position embedding: rotate each pair (x[2i], x[2i+1]) of the last axis by
    an angle whose cos and sin broadcast against x[..., head_dim // 2] (Meta's complex product).

    Written as (x0, x1) * cos + (x1, x0) * (-sin, sin): the swapped pair is a view, so the whole
    rotation is one elementwise expression, which fusion makes one kernel."""
    pairs = x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
    swapped = pairs[..., ::-1]
    cos, sin = cos.reshape(cos.shape + (1,)), sin.reshape(sin.shape + (1,))
    sign = Tensor.arange(2).reshape(2) * 2 - 1  # (-1, +1): negate sin for the first of each pair
    return (pairs * cos + swapped * (sin * sign)).reshape(x.shape).cast(x.dtype)


def causal_mask(q_len: int, k_len: int) -> Tensor:
    """True where query i may see key j. Queries are the last q_len of k_len positions
    (aligned to the bottom right), so a decode step with a KV cache sees every cached key."""
    return Tensor.arange(k_len).reshape(1, k_len) <= Tensor.arange(q_len).reshape(q_len, 1) + (k_len - q_len)


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                                 is_causal: bool = False, scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale + mask) v over [..., heads, seq, head_dim] tensors.

    Grouped-query attention: k and v may have fewer heads than q (a divisor of them); query
    head h reads key/value head h // (q_heads // kv_heads), as Llama's repeat_kv does.
    attn_mask is boolean (True = attend) or additive float, broadcast to [..., q_len, k_len].
    """
    *batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[-3], k.shape[-2]
    if q_heads % kv_heads or k.shape != v.shape[:-1] + (k.shape[-1],) or k.shape[-1] != head_dim:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit "
                         f"(k/v heads must divide q heads; k and v must share heads and length)")
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    q5 = _f32(q).reshape(*batch, kv_heads, group, q_len, head_dim)
    k5, v5 = _f32(k).unsqueeze(-3), _f32(v).unsqueeze(-3)
    scores = (q5 @ k5.transpose(-1, -2)) * scale           # [..., kv_heads, group, q_len, k_len]
    if is_causal:
        scores = causal_mask(q_len, k_len).where(scores, -math.inf)
    if attn_mask is not None:
        full = attn_mask.broadcast_to((*batch, q_heads, q_len, k_len))
        mask = full.reshape(*batch, kv_heads, group, q_len, k_len)
        scores = mask.where(scores, -math.inf) if mask.dtype == dtypes.bool_ else scores + mask
    out = softmax(scores, -1) @ v5                          # [..., kv_heads, group, q_len, v_dim]
    return out.reshape(*batch, q_heads, q_len, v.shape[-1]).cast(q.dtype)
