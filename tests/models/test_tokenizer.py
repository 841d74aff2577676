"""The torch-free tokenizer against open_clip's SimpleTokenizer: the same ids, string for string."""
import random
from pathlib import Path

import pytest
from open_clip.tokenizer import SimpleTokenizer, default_bpe

from itm.models.tokenizer import ClipTokenizer

HAND_PICKED = [
    "a red circle left of a blue square", "A Dog's   life!!", "naïve café déjà vu", "日本語のテキスト",
    "emoji 🐶🐱 ok", "&amp;lt;b&amp;gt; html &amp;amp;amp;", "<start_of_text> and <end_of_text> inside",
    "x<end_of_text>y", "numbers 12345 3.14", "tab\tnew\nline\r\n", "", "   ", "it's we're they've I'm you'll he'd",
    "ÅNGSTRÖM", "mojibake â€™ here", "\x00ctrl\x07chars\x7f", "a" * 300, "word " * 100, "Straße", "İstanbul",
    "ǅ titlecase", "ﬁ ligature", "ｆｕｌｌｗｉｄｔｈ", "don’t curly", "--- ... ??? !!!", "a_b-c.d", "\u200bzero width",
    "\ud800",
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    ClipTokenizer.from_open_clip(Path(default_bpe()), 77).save(path)
    return SimpleTokenizer(context_length=77), ClipTokenizer.from_file(path, 77)


def random_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyzABC XYZ.,!?'\"-éüßİ日本🐶0123456789&;<>_\t\n\u00a0\u200b"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(n)]


def test_same_ids_as_open_clip_on_many_strings(pair):
    ref, ours = pair
    captions = (Path(__file__).resolve().parents[2] / "data" / "samples" / "captions.txt").read_text().splitlines()
    texts = HAND_PICKED + captions + random_strings(2000)
    want, got = ref(texts).numpy(), ours(texts)
    mismatched = [t for t, a, b in zip(texts, want, got) if a.tolist() != b.tolist()]
    assert got.dtype.name == "int64" and got.shape == want.shape and mismatched == []


def test_long_texts_are_cut_and_end_with_end_of_text(pair):
    _, ours = pair
    ids = ours(["word " * 100])[0]
    assert ids[0] == ours.sot_id and ids[-1] == ours.eot_id and (ids != 0).all()
    assert ours(["a"])[0, :3].tolist() == [ours.sot_id, ours.encode("a")[0], ours.eot_id]


def test_text_that_skips_ftfy_is_text_ftfy_leaves_alone():
    import string

    import ftfy

    from itm.models.tokenizer import plain

    rng = random.Random(1)
    texts = ["".join(rng.choice(string.printable) for _ in range(rng.randint(0, 60))) for _ in range(3000)]
    skipped = [t for t in texts + HAND_PICKED if plain(t)]
    assert len(skipped) > 500 and all(ftfy.fix_text(t) == t for t in skipped)
    assert not plain("a &amp; b") and not plain("tab\there") and not plain("café")
