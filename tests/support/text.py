"""A tiny random BERT text encoder + WordPiece tokenizer written offline, for language-input tests.

Nothing can be downloaded from the Hub here, so tests build the text encoder with transformers' own
classes and `save_pretrained` it into a directory; the product loads that directory through the same
`AutoTokenizer` / `AutoModel` path it uses for a Hub id such as sentence-transformers/all-MiniLM-L6-v2.
"""

from __future__ import annotations

from pathlib import Path

# Enough words for MetaWorld/LIBERO-like instructions and the synthetic dataset's "move the square".
WORDS = (
    "pick place put open close push pull press turn move the a an up down left right of in on to from "
    "cube drawer door button square bowl plate block red green blue top side and"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tiny_text_encoder(directory: str | Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """Write a 1-layer random BERT (width `hidden_size`) and its tokenizer to `directory`; return it.

    A different `seed` gives different weights (so a different revision) with the same files.
    """
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
