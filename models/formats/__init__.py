"""Checkpoints on disk and back: reading the Hugging Face, Meta and GGUF layouts into Meta's
names (hf.py, meta.py, gguf.py; checkpoint.py tells them apart and checks what they read), a
model from a path or a size (loading.py), writing GGUF files (gguf_writer.py) with
llama-quantize's types per tensor (quant_mix.py), splitting weights over processes
(tensor_parallel.py), the Vision checkpoints' names (vision_checkpoint.py), and the files
fetched from PyPI (assets.py)."""
