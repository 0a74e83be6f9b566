"""The report tokenizer: BERT-style WordPiece through Hugging Face `tokenizers`.

Trained on the training reports (train_tokenizer) or loaded from a tokenizer.json / BERT vocab.txt;
[CLS] text [SEP], lower-cased, accents stripped, [PAD] = 0, padded and truncated to max_len
(97 by default). Checkpoints carry the tokenizer as its JSON string. A library:
data.py re-exports every name, so callers write `data.tokenize` etc.

    python -c "import tokenizer"
"""
from pathlib import Path

import torch
from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] = 0, as in BERT


def _bert_pipeline(tok):
    """BERT-style normaliser, pre-tokenizer, [CLS] ... [SEP] post-processor and decoder."""
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=True, lowercase=True)
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
    """Train a WordPiece tokenizer on `texts` (BERT-style); save it as tokenizer.json to `path`."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                        show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    # The trainer breaks frequency ties in hash-map order, which changes from call to call: give
    # the learned pieces ids in a fixed order (specials first, then sorted) so that the same texts
    # give the same ids, and two identical runs the same model.
    learned = sorted(set(tok.get_vocab()) - set(SPECIAL_TOKENS))
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + learned)}
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
