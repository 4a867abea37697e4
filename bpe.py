r"""
GPT-2's byte-level BPE tokenizer, from scratch, with nothing but the standard library: text <-> ids.

    tok = BPETokenizer.from_folder("gpt2")   # a folder holding GPT-2's vocab.json and merges.txt
    tok.encode("Hello world")                # [15496, 995]: "Hello", " world"
    tok.decode([15496, 995])                 # "Hello world"

encode(text) takes three steps:
  1. pre-tokenize: GPT-2's pattern cuts the text into contractions, words, numbers, runs of other
     symbols and runs of whitespace, so that no token spans two of them (" world" keeps its space):
         's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  2. bytes to symbols: a piece's UTF-8 bytes become printable characters through bytes_to_unicode()
     (byte 32 " " -> "Ġ", byte 10 "\n" -> "Ċ"), one per byte: every text, in any script, is spelled
     in the 256 base tokens, so nothing is ever "unknown";
  3. merge: join the adjacent pair of symbols whose merge has the lowest rank (its line in
     merges.txt), at every place it occurs, left to right; repeat until no adjacent pair has a rank,
     then look every symbol up in vocab.json. Text repeats its words, so each piece's ids are cached.
decode(ids) joins the ids' strings, maps each character back to its byte and decodes the UTF-8 with
errors="replace", as GPT-2 does: ids that cut a multi-byte character in two give U+FFFD.
decode(encode(s)) == s for every str that UTF-8 can encode, i.e. that holds no lone surrogate such
as "\ud800": that has no bytes, so no tokens, and encode() raises UnicodeEncodeError (a ValueError).
encode() reads "<|endoftext|>" in the text as plain text; append tok.eot_id to mark a document's end.

The pattern is written for Python's `re`, which has no \p{...}:
  - \p{L} and \p{N} are character classes listing, as ranges, every code point whose
    unicodedata.category starts with "L" / "N" (built once, on first use, in ~0.3 s): the regex
    module's definition, over the Unicode tables of the running Python (unicodedata.unidata_version,
    14.0 in 3.11, 15.0 in 3.12), while `regex` ships its own, often newer ones. That is the only
    difference: a code point whose category differs between the two versions, in practice one that
    is assigned in the newer and unassigned (Cn, so a "symbol") in the older, is split by the
    category Python gives it. Python 3.11 against regex 2026.5.9 (Unicode 17.0): 14,049 such code
    points, all Cn in 14.0 (letters and numbers added by Unicode 15.0 to 17.0).
  - \s is written out as Unicode's White_Space set, which is what the regex module's \s matches,
    not `re`'s \s: that also matches U+001C..U+001F (str.isspace() counts these separators), which
    GPT-2's regex splits as symbols. tests/test_bpe.py checks the whole pattern against `regex`.
"""
import hashlib
import json
import os
import re
import sys
import unicodedata


def bytes_to_unicode():
    """{byte: char}: the bytes that print as themselves keep their char, the other 68 bytes (controls,
    space, DEL, NBSP, soft hyphen) take chr(256 + n) in order, so vocab.json and merges.txt hold only
    visible characters. Insertion order is GPT-2's id order for its 256 base tokens."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(moved)}}


BYTE_ENCODER = bytes_to_unicode()
BYTE_DECODER = {c: b for b, c in BYTE_ENCODER.items()}

# Unicode's White_Space property, the regex module's \s (stable since Unicode 6.3).
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_pattern = None  # compiled on first use: listing all letters takes ~0.3 s, too slow for every import


def _category_class(letter, cats):
    """The body of a [...] class: every code point whose category starts with letter, as ranges."""
    return "".join(f"\\U{m.start():08x}-\\U{m.end() - 1:08x}" for m in re.finditer(letter + "+", cats))


def pretokenize_pattern():
    """GPT-2's pre-tokenizer as a compiled `re` pattern (see the module docstring)."""
    global _pattern
    if _pattern is None:
        # One letter per code point ("L", "N", "Z", ...): its runs of "L" and "N" are the ranges.
        cats = "".join(unicodedata.category(chr(c))[0] for c in range(sys.maxunicode + 1))
        L, N, S = _category_class("L", cats), _category_class("N", cats), WHITESPACE
        _pattern = re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+"
                              rf"|[{S}]+(?![^{S}])|[{S}]+")
    return _pattern


def pretokenize(text):
    """The pieces of text that BPE merges within, never across: "a   b" -> ["a", "  ", " b"]."""
    return pretokenize_pattern().findall(text)


def bpe(symbols, ranks):
    """Merge a list of symbols: while some adjacent pair has a rank, merge the lowest ranked pair at
    every place it occurs, left to right ("a a a" with "a a" -> ["aa", "a"])."""
    while len(symbols) > 1:
        pair = min(zip(symbols, symbols[1:]), key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def read_files(folder):
    """(vocab, merges) from folder/vocab.json and folder/merges.txt (a "#version" first line skipped)."""
    paths = [os.path.join(folder, name) for name in ("vocab.json", "merges.txt")]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"BPE tokenizer file not found: {path}")
    with open(paths[0], encoding="utf-8") as f:
        vocab = json.load(f)
    with open(paths[1], encoding="utf-8") as f:
        lines = f.read().splitlines()
    if lines and lines[0].startswith("#version"):  # only the first line: a later one is a merge
        lines = lines[1:]
    lines = [line for line in lines if line]
    merges = [tuple(line.split()) for line in lines]
    for n, merge in enumerate(merges):
        if len(merge) != 2:  # symbols never hold whitespace: bytes_to_unicode moved it away
            raise ValueError(f"{paths[1]}: merge {n + 1} is not two symbols: {lines[n]!r}")
    return vocab, merges


def write_files(folder, vocab, merges):
    """Write vocab.json and merges.txt (with Hugging Face's "#version: 0.2" first line) into folder."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, indent=2)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def byte_level_vocab(merges, eot="<|endoftext|>"):
    """GPT-2's vocab layout for a list of merges: the 256 byte symbols (ids 0..255, in bytes_to_unicode
    order), one token per merge in rank order, then eot (if not None). For tiny test tokenizers."""
    tokens = [*BYTE_ENCODER.values(), *(a + b for a, b in merges), *([eot] if eot else [])]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}  # two merges may make one token: one id


class BPETokenizer:
    def __init__(self, vocab, merges):
        self.vocab = dict(vocab)                 # {token string: id}
        self.merges = [tuple(m) for m in merges]
        self.ranks = dict(zip(self.merges, range(len(self.merges))))  # {pair: rank}, as GPT-2's
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.vocab_size = max(self.vocab.values(), default=-1) + 1
        self.eot_id = self.vocab.get("<|endoftext|>")
        self.cache = {}                          # {piece: its ids}, grows with the distinct pieces seen

    @classmethod
    def from_folder(cls, folder):
        return cls(*read_files(folder))

    def digest(self):
        """sha256 of the vocabulary and the merges: what a cache of token ids depends on."""
        text = json.dumps(self.vocab, sort_keys=True) + "\n" + "\n".join(" ".join(m) for m in self.merges)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def save(self, folder):
        write_files(folder, self.vocab, self.merges)

    def encode_piece(self, piece):
        """The ids of one pre-token, through the cache."""
        if piece not in self.cache:
            symbols = bpe([BYTE_ENCODER[b] for b in piece.encode("utf-8")], self.ranks)
            missing = [s for s in symbols if s not in self.vocab]
            if missing:
                raise ValueError(f"BPE symbol {missing[0]!r} of piece {piece!r} is not in the vocabulary")
            self.cache[piece] = [self.vocab[s] for s in symbols]
        return self.cache[piece]

    def encode(self, text):
        return [i for piece in pretokenize(text) for i in self.encode_piece(piece)]

    def decode(self, ids):
        unknown = [i for i in ids if i not in self.id_to_token]
        if unknown:
            raise ValueError(f"token id {unknown[0]!r} is not in the vocabulary (size {self.vocab_size})")
        text = "".join(self.id_to_token[i] for i in ids)
        return bytes(BYTE_DECODER[c] for c in text).decode("utf-8", errors="replace")
