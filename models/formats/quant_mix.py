"""Which type each weight gets in a GGUF file of a given llama.cpp file type (`llama-quantize`'s
`Q4_K_M`, `Q8_0`, ...), by llama.cpp's own rules (`llama_tensor_get_type` in llama-quant.cpp),
so that a file we write holds the same types as one llama-quantize makes from the same weights:

- norms (1-D) stay float32; the other matrices take the file type's base type, except:
- the output head (or, tied, the token embedding it shares) takes Q6_K, or Q8_0 for a Q8_0 file
  or when its rows are not whole 256-value super-blocks;
- Q4_K_M / Q5_K_M: attn_v and ffn_down take Q6_K in the layers `more_bits` picks (the first and
  last eighth and every third between); Q4_K_S: Q5_K for attn_v of layers 0-3 and ffn_down of
  the first eighth; a 70B (80 layers, grouped heads) takes Q5_K for the other attn_v;
- a type whose block does not divide a row falls back as llama.cpp's does (Q4_K -> Q5_0,
  Q5_K -> Q5_1, Q6_K -> Q8_0; then float16 if 32 does not divide it either).

`pure` (llama-quantize --pure) gives every matrix the base type, with the same fallback.
"""
from dataclasses import dataclass, replace

from models.llama3.config import LlamaConfig
from ops import dtypes


@dataclass(frozen=True)
class FileType:
    name: str           # as llama-quantize spells it
    base: dtypes.DType  # the type most matrices take
    ftype: int          # llama.cpp's LLAMA_FTYPE_MOSTLY_*, stored as general.file_type
    pure: bool = False

    def tensor_type(self, name: str, shape: tuple[int, ...], config: LlamaConfig) -> dtypes.DType:
        """The type the weight `name` (Meta's name) of this logical shape is stored in."""
        if len(shape) < 2:
            return dtypes.float32
        if not self.base.block:
            return self.base
        chosen = self.base if self.pure else self._mixed(name, shape, config)
        return fallback(chosen, shape[-1])

    def _mixed(self, name: str, shape, config: LlamaConfig) -> dtypes.DType:
        head = name == "output.weight" or (config.tied_embeddings and name == "tok_embeddings.weight")
        if head:
            if shape[-1] % self.base.block.values or self.base == dtypes.q8_0:
                return dtypes.q8_0
            return dtypes.q6_k  # Q8_0 where rows are not whole super-blocks: see fallback
        if not name.startswith("layers."):
            return self.base
        _, layer, rest = name.split(".", 2)
        layer, n = int(layer), config.n_layers
        if rest == "attention.wv.weight":
            if self.name in ("Q4_K_M", "Q5_K_M") and more_bits(layer, n):
                return dtypes.q6_k
            if self.name == "Q4_K_S" and layer < 4:
                return dtypes.q5_k
            if n == 80 and config.n_kv_heads != config.n_heads and self.base == dtypes.q4_k:
                return dtypes.q5_k  # llama.cpp's 70B rule (its 8 query heads share each v head)
        if rest == "feed_forward.w2.weight":
            if self.name in ("Q4_K_M", "Q5_K_M") and more_bits(layer, n):
                return dtypes.q6_k
            if self.name == "Q4_K_S" and layer < n // 8:
                return dtypes.q5_k
        return self.base


def more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the layers whose attn_v / ffn_down get more bits in _M files."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


FALLBACK = {dtypes.q4_k: dtypes.q5_0, dtypes.q5_k: dtypes.q5_1, dtypes.q6_k: dtypes.q8_0}


def fallback(dtype: dtypes.DType, columns: int) -> dtypes.DType:
    """dtype, or what llama.cpp stores instead when its blocks do not divide a row."""
    if columns % dtype.block.values == 0:
        return dtype
    dtype = FALLBACK.get(dtype, dtype)
    return dtype if columns % dtype.block.values == 0 else dtypes.float16


FILE_TYPES = {ft.name.lower(): ft for ft in (
    FileType("F32", dtypes.float32, 0), FileType("F16", dtypes.float16, 1), FileType("BF16", dtypes.bfloat16, 32),
    FileType("Q8_0", dtypes.q8_0, 7), FileType("Q4_0", dtypes.q4_0, 2), FileType("Q4_1", dtypes.q4_1, 3),
    FileType("Q5_0", dtypes.q5_0, 8), FileType("Q5_1", dtypes.q5_1, 9),
    FileType("Q4_K_S", dtypes.q4_k, 14), FileType("Q4_K_M", dtypes.q4_k, 15),
    FileType("Q5_K_S", dtypes.q5_k, 16), FileType("Q5_K_M", dtypes.q5_k, 17), FileType("Q6_K", dtypes.q6_k, 18))}


def pure(dtype: dtypes.DType) -> FileType:
    """Every matrix in `dtype`, under the first file type of that base (q4_k: Q4_K_S's id)."""
    for file_type in FILE_TYPES.values():
        if file_type.base == dtype:
            return replace(file_type, pure=True)
    raise ValueError(f"GGUF weights as {dtype.name} are not written here "
                     f"({', '.join(sorted({ft.base.name for ft in FILE_TYPES.values()}))})")
