"""The report tokenizer: BERT-style WordPiece through Hugging Face `tokenizers`.

Built from the training reports (train_tokenizer: the same texts always give the same ids) or
loaded from a tokenizer.json / BERT vocab.txt; [CLS] text [SEP], lower-cased, accents stripped,
[PAD] = 0, padded and truncated to max_len (97 by default). Checkpoints carry the tokenizer as its
JSON string. A library: data.py re-exports every name, so callers write `data.tokenize` etc.

    python -c "import tokenizer"
"""
from collections import Counter
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] = 0, as in BERT


def _normalizer():
    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                      strip_accents=True, lowercase=True)


def _bert_pipeline(tok):
    """BERT-style normaliser, pre-tokenizer, [CLS] ... [SEP] post-processor and decoder."""
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.add_special_tokens([t for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None])
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls is None or sep is None:
        raise ValueError("tokenizer vocabulary lacks [CLS] or [SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece()
    return tok


def train_tokenizer(texts, vocab_size=4096, path=None):
    """Build a WordPiece vocabulary from `texts` (BERT-style); save it as tokenizer.json to `path`.

    The vocabulary is the special tokens, every character seen (alone and as a "##" continuation,
    so that any word can be spelled), then whole words by frequency, ties in alphabetical order, up
    to vocab_size; a word outside it is split into the longest known pieces, as BERT does. We do not
    use tokenizers' WordPieceTrainer: its merges break frequency ties in hash-map order, so every
    call gives another vocabulary, and two identical training runs would not be identical.
    """
    norm, pre = _normalizer(), pre_tokenizers.BertPreTokenizer()  # as the tokenizer will split
    counts = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    chars = sorted({c for w in counts for c in w})
    pieces = SPECIAL_TOKENS + chars + ["##" + c for c in chars]
    if vocab_size < len(pieces):
        raise ValueError(f"vocab_size={vocab_size} is too small: the special tokens and the "
                         f"{len(chars)} characters of the texts need {len(pieces)}")
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    pieces += words[: vocab_size - len(pieces)]
    vocab = {p: i for i, p in enumerate(pieces)}
    tok = _bert_pipeline(Tokenizer(models.WordPiece(vocab, unk_token="[UNK]")))
    if path is not None:
        path = Path(path)
        path = path / "tokenizer.json" if path.is_dir() else path
        path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
    return tok


def load_tokenizer(path):
    """Load a tokenizer.json or a BERT vocab.txt (or a folder holding either)."""
    path = Path(path)
    if path.is_dir():
        hits = [path / n for n in ("tokenizer.json", "vocab.txt") if (path / n).is_file()]
        if not hits:
            raise FileNotFoundError(f"{path}: holds neither tokenizer.json nor vocab.txt")
        path = hits[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    if path.suffix == ".json":
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a plain Exception on bad JSON
            raise ValueError(f"{path}: not a tokenizers JSON file ({e})") from e
    vocab = models.WordPiece.read_file(str(path))
    return _bert_pipeline(Tokenizer(models.WordPiece(vocab, unk_token="[UNK]")))


def tokenizer_from_string(text):
    """The inverse of Tokenizer.to_str(): how checkpoints carry their tokenizer."""
    return Tokenizer.from_str(text)


def tokenize(tok, texts, max_len=97):
    """-> (input_ids, attention_mask), LongTensor (B, max_len): [CLS] text [SEP], truncated, padded.

    Sets the tokenizer's truncation/padding to max_len; padding uses the [PAD] id (0 in our vocab).
    """
    pad = tok.token_to_id("[PAD]")
    pad = 0 if pad is None else pad
    tok.enable_truncation(max_length=max_len)
    tok.enable_padding(pad_id=pad, pad_token="[PAD]", length=max_len)
    enc = tok.encode_batch(list(texts))
    ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
    return ids, mask
