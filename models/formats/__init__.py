"""Checkpoints on disk and back: reading the Hugging Face, Meta and GGUF layouts into Meta's names
(checkpoint.py), writing GGUF files (gguf_writer.py) with llama-quantize's types per tensor
(quant_mix.py), splitting weights over processes (tensor_parallel.py), the Vision checkpoints'
names (vision_checkpoint.py), and the files fetched from PyPI (assets.py)."""
