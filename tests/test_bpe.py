import random
import sys
import unicodedata

import pytest

import bpe
from bpe import BPETokenizer, byte_level_vocab, pretokenize, read_files, write_files

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# The ids below are GPT-2's own: its first 256 tokens are the byte symbols in bytes_to_unicode order.
T, H, E, A, B, C = 83, 71, 68, 64, 65, 66   # "t", "h", "e", "a", "b", "c": ord(c) - ord("!")
SPACE, NEWLINE = 220, 198                   # "Ġ" (byte 32), "Ċ" (byte 10)

# A pool for random strings: every kind of piece, the separators where `re` and `regex` disagree
# (\x1c..\x1f), other Unicode spaces, contractions in both cases, combining marks, emoji, non-decimal
# numbers (²: No, Ⅳ: Nl), other digits (٣), and the symbols and letters around them.
POOL = [" ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0", "\u1680",
        "\u2003", "\u2028", "\u3000", "\u180e", "\u200b", "'", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d",
        "'S", "'T", "s", "T", "re", "_", "0", "42", "²", "Ⅳ", "٣", "a", "Zz", "é", "e\u0301", "ß",
        "привет", "你好", "ㄱ", "한", "🙂", "👍🏽", "👨‍👩‍👧",
        "!", "?!", ".", ",", "-", "$", "\x00", "\x7f", "\ufffd", "𝔘"]


def random_strings(n, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice(POOL) for _ in range(rng.randrange(12))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny():
    """256 byte tokens and three merges, ids laid out as GPT-2's: Ġt = 256, he = 257, Ġthe = 258."""
    return BPETokenizer(byte_level_vocab([("Ġ", "t"), ("h", "e"), ("Ġt", "he")]),
                        [("Ġ", "t"), ("h", "e"), ("Ġt", "he")])


# --- bytes_to_unicode ---

def test_bytes_to_unicode_values():
    table = bpe.bytes_to_unicode()
    assert table[32] == "Ġ" == "\u0120" and table[10] == "Ċ" and table[0] == "Ā" == "\u0100"
    assert table[33] == "!" and table[ord("a")] == "a" and table[0xA1] == "¡" and table[0xFF] == "ÿ"
    assert table[0x7F] == chr(256 + 33) and table[0xAD] == "Ń" == chr(256 + 67)   # DEL, soft hyphen
    assert list(table.values())[:3] == ["!", '"', "#"] and list(table.values())[188] == "Ā"


def test_bytes_to_unicode_is_a_bijection_onto_printable_chars():
    table = bpe.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert all(bpe.BYTE_DECODER[c] == b for b, c in table.items())


# --- pre-tokenization ---

@pytest.mark.parametrize("text, pieces", [
    ("Hello world", ["Hello", " world"]),
    ("foo_bar", ["foo", "_", "bar"]),                       # _ is neither \p{L} nor \p{N}
    ("abc123", ["abc", "123"]),
    (" 42", [" 42"]),
    ("3.14 $100", ["3", ".", "14", " $", "100"]),
    ("héllo wörld", ["héllo", " wörld"]),
    ("he\u0301llo", ["he", "\u0301", "llo"]),               # a combining accent (Mn) is a "symbol"
    ("привет мир", ["привет", " мир"]),
    ("你好世界 ok", ["你好世界", " ok"]),
    ("a   b", ["a", "  ", " b"]),                           # the last space goes with the word
    ("  hello", [" ", " hello"]),
    ("a  ", ["a", "  "]),                                   # trailing spaces: one piece
    ("hello\n", ["hello", "\n"]),
    ("hi\n\nthere", ["hi", "\n", "\n", "there"]),           # \s+(?!\S) backs off one char, then \s+
    ("\t\tx", ["\t", "\t", "x"]),
    ("a\r\nb", ["a", "\r", "\n", "b"]),
    ("a\r\n", ["a", "\r\n"]),
    ("a\xa0b", ["a", "\xa0", "b"]),                         # " ?" is a plain space only
    ("x\x1cy", ["x", "\x1c", "y"]),                         # not White_Space: a symbol (`re`'s \s differs)
    ("I'm don't we've they'll it'd she's you're",
     ["I", "'m", " don", "'t", " we", "'ve", " they", "'ll", " it", "'d", " she", "'s", " you", "'re"]),
    ("DON'T", ["DON", "'", "T"]),                           # the contractions are lowercase only
    ("'sup", ["'s", "up"]),
    ("don’t", ["don", "’", "t"]),                           # a curly apostrophe is a symbol
    ("x² Ⅳ2 ٣", ["x", "²", " Ⅳ2", " ٣"]),                  # No, Nl and Nd are all \p{N}
    ("👍🏽 ok!!", ["👍🏽", " ok", "!!"]),
    ("", []),
])
def test_pretokenize(text, pieces):
    assert pretokenize(text) == pieces


def test_pretokenize_matches_regex_on_random_strings():
    regex = pytest.importorskip("regex")
    gpt2 = regex.compile(GPT2_PATTERN)
    for s in random_strings(3000):
        assert pretokenize(s) == gpt2.findall(s), repr(s)


def test_pretokenize_matches_regex_on_every_code_point():
    # Code points unassigned (Cn) in either Unicode version are the one documented difference.
    regex = pytest.importorskip("regex")
    text = regex.sub(r"\p{Cn}+", "", "".join(map(chr, range(sys.maxunicode + 1))))
    text = "".join(c for c in text if unicodedata.category(c) != "Cn")
    assert pretokenize(text) == regex.findall(GPT2_PATTERN, text)


# --- BPE ---

def test_encode_by_hand(tiny):
    # " the": Ġ t h e -> Ġt h e (rank 0) -> Ġt he (rank 1) -> Ġthe (rank 2); "the" stops at t he.
    assert tiny.encode("the the") == [T, 257, 258]
    assert tiny.encode("  the\n") == [SPACE, 258, NEWLINE]
    assert tiny.encode(" teh") == [256, E, H]
    assert tiny.encode("é") == [127, 102]   # bytes C3 A9: "Ã" = 106 + 0xC3 - 0xAE, "©" = 94 + 0xA9 - 0xA1


def test_lowest_rank_wins_over_leftmost():
    # b c has the lower rank, so "abc" -> a bc, never ab c, although a b comes first.
    tok = BPETokenizer(byte_level_vocab([("b", "c"), ("a", "b")]), [("b", "c"), ("a", "b")])
    assert tok.encode("abc") == [A, 256] and tok.encode("cab") == [C, 257] and tok.encode("bcb") == [256, B]


def test_merge_every_occurrence_left_to_right():
    merges = [("a", "a"), ("aa", "aa")]
    tok = BPETokenizer(byte_level_vocab(merges), merges)
    assert bpe.bpe(list("aaa"), tok.ranks) == ["aa", "a"]
    assert tok.encode("aaa") == [256, A] and tok.encode("aaaa") == [257]
    assert tok.encode("aaaaa") == [257, A]


def test_vocab_size_and_eot(tiny):
    assert tiny.vocab_size == 260 and tiny.eot_id == 259
    assert tiny.decode([tiny.eot_id]) == "<|endoftext|>"
    plain = BPETokenizer(byte_level_vocab([], eot=None), [])
    assert plain.vocab_size == 256 and plain.eot_id is None
    assert plain.encode("<|endoftext|>") == [ord(c) - 33 for c in "<|endoftext|>"]   # plain text


def test_round_trip(tiny):
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ã", "©"), ("Ġ", "Ġ"), ("ĠĠ", "ĠĠ"), ("Ċ", "Ċ")]
    tok = BPETokenizer(byte_level_vocab(merges), merges)
    fixed = ["", " ", "Hello world", "the  the\n\n\tthe", "é ü 你好 👍🏽 👨‍👩‍👧", "e\u0301\u0308",
             "\x00\x01\x1b\x7f", "a\r\nb\r\n", " " * 17 + "x" + "\t" * 5, "I'm DON'T", "\ufeffBOM",
             "\U0010ffff\ue000"]
    for s in fixed + random_strings(500, seed=1):
        assert tok.decode(tok.encode(s)) == s, repr(s)
        assert tiny.decode(tiny.encode(s)) == s, repr(s)


def test_decode_split_character_gives_replacement(tiny):
    ids = tiny.encode("é")
    assert len(ids) == 2 and tiny.decode(ids[:1]) == "\ufffd" and tiny.decode(ids[1:] + [A]) == "\ufffda"


def test_errors(tiny):
    with pytest.raises(UnicodeEncodeError):                 # a lone surrogate has no UTF-8 bytes
        tiny.encode("a\ud800")
    vocab = byte_level_vocab([])
    del vocab["Ġ"]
    with pytest.raises(ValueError, match="'Ġ' of piece ' x' is not in the vocabulary"):
        BPETokenizer(vocab, []).encode(" x")
    with pytest.raises(ValueError, match="token id 999 is not in the vocabulary"):
        tiny.decode([1, 999])


# --- files ---

def test_write_then_from_folder(tiny, tmp_path):
    tiny.save(tmp_path / "tok")
    lines = (tmp_path / "tok" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines == ["#version: 0.2", "Ġ t", "h e", "Ġt he"]
    tok = BPETokenizer.from_folder(tmp_path / "tok")
    assert tok.vocab == tiny.vocab and tok.merges == tiny.merges and tok.encode("the the") == [T, 257, 258]


def test_from_folder_without_version_line(tmp_path):
    write_files(tmp_path, {"a": 0, "b": 1, "ab": 2}, [])
    (tmp_path / "merges.txt").write_text("a b\n\n", encoding="utf-8")
    assert read_files(tmp_path) == ({"a": 0, "b": 1, "ab": 2}, [("a", "b")])
    (tmp_path / "merges.txt").write_text("#version: 0.2\n#version x\n", encoding="utf-8")
    assert read_files(tmp_path)[1] == [("#version", "x")]   # only a first line is a comment
    (tmp_path / "merges.txt").write_text("a b\n", encoding="utf-8")
    assert BPETokenizer.from_folder(tmp_path).encode("abba") == [2, 1, 0]


def test_bad_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        BPETokenizer.from_folder(tmp_path)
    write_files(tmp_path, {"a": 0}, [])
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n", encoding="utf-8")
    with pytest.raises(ValueError, match="merge 1 is not two symbols"):
        BPETokenizer.from_folder(tmp_path)
