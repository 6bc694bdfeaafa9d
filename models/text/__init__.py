"""Text in and out of token ids: the Llama 3 (tiktoken), byte-level BPE and SentencePiece
tokenizers (tokenizer.py, spm_tokenizer.py), and chat prompts from templates (chat.py)."""
