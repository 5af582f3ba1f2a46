"""Tests of data/prepare.py: the play parser, the cutting rule, the token stream and the real cache.

    python -m pytest -q tests/test_data.py
"""
import io
import json
import os
import tarfile

import numpy as np
import pytest

import data.prepare as prep
from data.prepare import EOT, format_prompt, get_tokenizer

# A hand-written excerpt in the Gutenberg layout: front matter, ACT and Scene lines, stage directions
# (own line, inline, two lines long), a multi-line speech, one-line speeches "He." and "Say." right
# below their speaker line, ALL-CAPS speakers (with and without '.', and with the speech on the same
# line), and a speaker line separated from its speech by a blank line and a direction.
PLAY = """\
THE TRAGEDY OF TESTING

PERSONS REPRESENTED.

Bernardo, an officer.
Francisco, a soldier.

SCENE. Elsinore.


ACT I.

Scene I. Elsinore. A platform before the Castle.

[Francisco at his post. Enter to him Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

Ber.
He.

Fran.
You come most carefully
upon your hour. [Aside.] 'Tis bitter cold.

[Enter Horatio and
Marcellus.]

Ber.
Say.
What, is Horatio there?

[Exeunt.]

Scene II. A room of state in the Castle.

KING.
Welcome, Hamlet.

HAMLET. Ay, my lord.

THESEUS
Now, fair Hippolyta.

SECOND LORD.

[Aside.]

No, faith; not so much.
"""

SCENES = [
    [("Ber", "Who's there?"),
     ("Fran", "Nay, answer me: stand, and unfold yourself."),
     ("Ber", "He."),
     ("Fran", "You come most carefully upon your hour. 'Tis bitter cold."),
     ("Ber", "Say. What, is Horatio there?")],
    [("KING", "Welcome, Hamlet."),
     ("HAMLET", "Ay, my lord."),
     ("THESEUS", "Now, fair Hippolyta."),
     ("SECOND LORD", "No, faith; not so much.")],
]


@pytest.fixture(scope="module")
def enc():
    return get_tokenizer()


# ----------------------------------------------------------------------------------------------------
# Parsing

def test_parse_play_excerpt():
    assert prep.parse_play(PLAY) == SCENES


def test_stage_directions_and_front_matter_dropped():
    text = " ".join(speech for scene in prep.parse_play(PLAY) for _, speech in scene)
    for dropped in ("[", "]", "Aside", "Enter", "Exeunt", "Marcellus", "PERSONS", "soldier", "Elsinore"):
        assert dropped not in text


def test_turns_never_cross_a_scene():
    turns = prep.turns_from_scenes(SCENES)
    assert turns == [
        ("Who's there?", "Nay, answer me: stand, and unfold yourself.", 0),
        ("Nay, answer me: stand, and unfold yourself.", "He.", 0),
        ("He.", "You come most carefully upon your hour. 'Tis bitter cold.", 0),
        ("You come most carefully upon your hour. 'Tis bitter cold.", "Say. What, is Horatio there?", 0),
        ("Welcome, Hamlet.", "Ay, my lord.", 1),
        ("Ay, my lord.", "Now, fair Hippolyta.", 1),
        ("Now, fair Hippolyta.", "No, faith; not so much.", 1),
    ]  # no ("Say. What, is Horatio there?", "Welcome, Hamlet.") across the scene break


def test_same_speaker_twice_is_one_speech_and_no_turn():
    scenes = prep.parse_play("ACT I.\n\nBer.\nStand.\n\n[Exit Fran.]\n\nBer.\nHo!\n\nFran.\nWho?\n")
    assert scenes == [[("Ber", "Stand. Ho!"), ("Fran", "Who?")]]
    assert prep.turns_from_scenes([[("A", "x"), ("A", "y"), ("B", "z")]]) == [("y", "z", 0)]


def test_text_without_speakers_gives_no_turns():
    poem = "SONNET\n\nShall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n"
    assert prep.parse_play(poem) == []                                   # no ACT/SCENE line at all
    assert prep.parse_play("ACT I.\n\n" + poem) == []                    # a heading, but no speaker
    assert prep.turns_from_scenes(prep.parse_play("")) == []


# ----------------------------------------------------------------------------------------------------
# Cutting long speeches: token counts of the four sentences (with their leading space) are 4, 7, 5, 8.

TEXT = "Who is there? Stand, and unfold yourself. Long live the king! He comes most carefully upon his hour."


def test_cut_reply_keeps_whole_first_sentences(enc):
    assert [prep.n_tokens(enc, s) for s in prep.SENTENCE_END_RE.split(TEXT)] == [4, 7, 5, 8]
    two = "Who is there? Stand, and unfold yourself."
    three = two + " Long live the king!"
    assert prep.cut_reply(TEXT, enc, max_tokens=15) == two              # 4 + 7 = 11; + 5 would be 16
    assert prep.cut_reply(TEXT, enc, max_tokens=16) == three
    assert prep.cut_reply(TEXT, enc, max_tokens=24) == TEXT             # fits: unchanged


def test_cut_prompt_keeps_whole_last_sentences(enc):
    last_two = "Long live the king! He comes most carefully upon his hour."
    assert prep.cut_prompt(TEXT, enc, max_tokens=14) == last_two        # 8 + 5 = 13; + 7 would be 20
    assert prep.cut_prompt(TEXT, enc, max_tokens=12) == "He comes most carefully upon his hour."
    assert prep.cut_prompt("  Who is\n there?  ", enc) == "Who is there?"  # whitespace collapsed


def test_cut_at_dash_and_semicolon(enc):
    text = "A fool, a fool!--I met a fool i' the forest, A motley fool; a miserable world!"
    assert prep.cut_reply(text, enc, max_tokens=9) == "A fool, a fool!--"
    assert prep.cut_prompt(text, enc, max_tokens=8) == "a miserable world!"


def test_cut_one_long_sentence_by_tokens(enc):
    text = ("Now is the winter of our discontent made glorious summer by this sun of York and all the clouds "
            "that lour'd upon our house in the deep bosom of the ocean buried")          # no sentence end
    reply, prompt = prep.cut_reply(text, enc, max_tokens=10), prep.cut_prompt(text, enc, max_tokens=10)
    assert text.startswith(reply + " ") and text.endswith(" " + prompt)                   # whole words
    assert 7 <= prep.n_tokens(enc, reply) <= 10 and 7 <= prep.n_tokens(enc, prompt) <= 10
    assert reply.startswith("Now is the winter") and prompt.endswith("ocean buried")


# ----------------------------------------------------------------------------------------------------
# The token stream of one turn

def test_stream_layout_of_one_turn(enc):
    ids, mask = prep.encode_turn(enc, "Who's there?", "Nay, answer me.")
    prompt_ids = enc.encode_ordinary("\n\nHuman: Who's there?\n\nAssistant:")
    reply_ids = enc.encode_ordinary(" Nay, answer me.")
    assert ids == prompt_ids + reply_ids + [EOT]
    assert mask == [0] * len(prompt_ids) + [1] * (len(reply_ids) + 1)
    assert ids[-1] == EOT == 8191 and mask[-1] == 1
    assert enc.decode([t for t, m in zip(ids, mask) if m][:-1]) == " Nay, answer me."


# ----------------------------------------------------------------------------------------------------
# The real data: built once per test session (a few seconds), reused if data/cache/ already has it.

@pytest.fixture(scope="module")
def meta():
    return prep.prepare(verbose=False)


def test_splits_are_disjoint_by_play(meta):
    works = {s: {t["work"] for t in prep.load_turns(s)} for s in prep.SPLITS}
    assert works["test"] == set(prep.TEST_PLAYS) == set(meta["test_plays"])
    assert works["val"] == set(prep.VAL_PLAYS) == set(meta["val_plays"])
    assert not (works["train"] & works["val"]) and not (works["train"] & works["test"])
    assert not (works["val"] & works["test"])
    assert len(works["train"]) == meta["plays_with_dialogue"] - 5


def test_real_cache_counts_and_layout(meta, enc):
    assert meta["works_read"] == 42 and meta["plays_with_dialogue"] == 37
    assert min(meta["turns_per_play"].values()) > 300                   # every play parsed into dialogue
    for split in prep.SPLITS:
        turns = prep.load_turns(split)
        ids = np.fromfile(os.path.join(prep.CACHE_DIR, f"{split}.bin"), dtype=np.uint16)
        mask = np.fromfile(os.path.join(prep.CACHE_DIR, f"{split}_mask.bin"), dtype=np.uint8)
        assert len(turns) == meta["turns"][split] > 0
        assert len(ids) == len(mask) == meta["tokens"][split]
        assert mask.sum() == meta["reply_tokens"][split]
        ends = np.flatnonzero(ids == EOT)                                 # EOT only ever ends a reply
        assert len(ends) == len(turns) and ends[-1] == len(ids) - 1 and mask[ends].all()
        assert not mask[ends[:-1] + 1].any()                              # each next turn starts with prompt
        assert all(t["prompt"] and t["reply"] for t in turns)
    first = prep.load_turns("test")[0]                                    # the stream starts with turn 0
    test_ids = np.fromfile(os.path.join(prep.CACHE_DIR, "test.bin"), dtype=np.uint16)
    end = int(np.flatnonzero(test_ids == EOT)[0])
    assert enc.decode(test_ids[:end].tolist()) == format_prompt(first["prompt"]) + " " + first["reply"]


def test_real_turns_respect_the_token_limit(meta, enc):
    for t in prep.load_turns("test"):
        assert prep.n_tokens(enc, t["prompt"]) <= meta["max_tokens"]
        assert prep.n_tokens(enc, t["reply"]) <= meta["max_tokens"]
        assert "[" not in t["prompt"] + t["reply"]


def test_load_turns_rejects_unknown_split():
    with pytest.raises(ValueError, match="unknown split"):
        prep.load_turns("dev")


# ----------------------------------------------------------------------------------------------------
# Missing or broken archive, and the build on a tiny archive (atomic outputs, meta.json last)

def make_tarball(path, works):
    with tarfile.open(path, "w:xz") as tar:
        for name, text in works.items():
            raw = text.encode("utf-8")
            info = tarfile.TarInfo(f"shakespeare/{name}_gut.txt")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def test_missing_tarball_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "TARBALL", str(tmp_path / "shakespeare.tar.xz"))
    monkeypatch.setattr(prep, "CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "shakespeare.tar.xz")):
        prep.prepare(force=True, verbose=False)
    (tmp_path / "shakespeare.tar.xz").write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="not a readable .tar.xz"):
        prep.prepare(force=True, verbose=False)
    assert not (tmp_path / "cache" / "meta.json").exists()


def test_build_on_a_tiny_archive(tmp_path, monkeypatch):
    tarball, cache = tmp_path / "tiny.tar.xz", tmp_path / "cache"
    make_tarball(tarball, {"hamlet": PLAY, "lear": PLAY, "sonnets": "I\n\nShall I compare thee?\n"})
    monkeypatch.setattr(prep, "TARBALL", str(tarball))
    monkeypatch.setattr(prep, "CACHE_DIR", str(cache))
    monkeypatch.setattr(prep, "VAL_PLAYS", ())
    monkeypatch.setattr(prep, "TEST_PLAYS", ("hamlet",))
    meta = prep.prepare(verbose=False)
    assert meta["works_read"] == 3 and meta["plays_with_dialogue"] == 2
    assert meta["turns"] == {"train": 7, "val": 0, "test": 7}
    assert json.loads((cache / "meta.json").read_text()) == meta
    assert [t["work"] for t in prep.load_turns("test")] == ["hamlet"] * 7
    assert not [f for f in os.listdir(cache) if f.endswith(".tmp")]

    # a rebuild that dies half-way leaves no meta.json, so the next prepare() rebuilds from scratch
    def interrupted(*args):
        raise RuntimeError("interrupted")
    monkeypatch.setattr(prep, "encode_turn", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        prep.prepare(force=True, verbose=False)
    assert not (cache / "meta.json").exists()
