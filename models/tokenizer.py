"""CLIP's byte-level BPE tokenizer without torch: the same ids as open_clip's SimpleTokenizer.

The cleaning is SimpleTokenizer's own (ftfy, HTML entities, whitespace, lower case), in Python;
the splitting and the BPE run in Hugging Face `tokenizers`, configured as SimpleTokenizer:
its word pattern, GPT-2's byte-to-unicode table, `</w>` ending each word, and its two special
tokens taken whole. `from_open_clip` turns open_clip's vocabulary file into a tokenizer.json,
written beside an exported model (models/onnx_export.py); queries load that file.

    >>> tok = ClipTokenizer.from_file(Path("tokenizer.json"), context_length=77)
    >>> tok(["a red circle"])[0, :5].tolist()
    [49406, 320, 736, 7117, 49407]
"""
from __future__ import annotations

import gzip
import html
from pathlib import Path
from typing import Sequence

import numpy as np

SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")  # open_clip's start and end of text, ids 49406 and 49407
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
VOCAB_MERGES = 49152 - 256 - 2  # merges of the vocabulary file that SimpleTokenizer reads


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: each byte as a printable character, so that BPE never sees whitespace or control bytes."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clean(text: str) -> str:
    """SimpleTokenizer's 'lower' cleaning: ftfy, HTML entities unescaped twice, whitespace collapsed, lower case."""
    if not plain(text):
        import ftfy  # only for text it could change: its import costs a cold query tens of milliseconds

        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).strip().lower()


def plain(text: str) -> bool:
    """Printable ASCII without '&': nothing that ftfy.fix_text changes (its fixes need other characters:
    mojibake, curly quotes, ligatures, wide forms, control and escape characters, HTML entities)."""
    return text.isascii() and text.isprintable() and "&" not in text


class ClipTokenizer:
    """Texts -> (B, context_length) int64 ids: start token, BPE tokens, end token, zero padding.

    A text longer than the context is cut and ends with the end token, as open_clip cuts it.
    """

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer
        self.context_length = context_length
        self.sot_id, self.eot_id = (tokenizer.token_to_id(t) for t in SPECIAL_TOKENS)

    @classmethod
    def from_file(cls, path: Path, context_length: int) -> ClipTokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), context_length)

    @classmethod
    def from_open_clip(cls, bpe_path: Path, context_length: int) -> ClipTokenizer:
        """From open_clip's bpe_simple_vocab_16e6.txt.gz, with the vocabulary SimpleTokenizer builds from it."""
        from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

        lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1:VOCAB_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        chars = list(bytes_to_unicode().values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
        tok = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, merges, end_of_word_suffix="</w>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),  # keep the matches only
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.add_special_tokens([AddedToken(t, single_word=False, normalized=False) for t in SPECIAL_TOKENS])
        return cls(tok, context_length)

    def save(self, path: Path) -> None:
        self.tokenizer.save(str(path))

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without the start and end tokens."""
        return self.tokenizer.encode(clean(text), add_special_tokens=False).ids

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.context_length), np.int64)
        for i, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id][:self.context_length]
            ids[-1] = self.eot_id
            out[i, :len(ids)] = ids
        return out
