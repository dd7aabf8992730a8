"""The bundled data: a small pretraining corpus, SFT conversations and the tokenizer trained on them.

`python -m minillm.data.sample_data` regenerates the two jsonl files (byte-identical for the same seed) and
`python -m minillm.data.train_tokenizer` the tokenizer; both are tools, not part of the reading path.
"""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
SAMPLE_PRETRAIN = DATA_DIR / "pretrain.jsonl"
SAMPLE_SFT = DATA_DIR / "sft.jsonl"
TOKENIZER_DIR = DATA_DIR / "tokenizer"
