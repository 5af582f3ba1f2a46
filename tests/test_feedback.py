"""Tests for data/feedback.py ([流程与实践 §3.2]): the four kinds of feedback and HH-RLHF read against
hand-made fixtures, every bad line named by file and line, and appends that never lose a record."""
import json
import os
import re

import pytest

from data.feedback import read_feedback, sft_examples, write_feedback
from data.prepare import ASSISTANT, HUMAN, format_prompt

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


# ----------------------------------------------------------------------------------- feedback reader

def test_read_all_four_kinds():
    path = os.path.join(FIXTURES, "feedback_all_kinds.jsonl")
    recs, n_bad = read_feedback(path)
    assert n_bad == 0
    assert [r["kind"] for r in recs] == ["comparison", "ranking", "rating", "correction"]
    comp, rank, rating, corr = recs
    assert comp["prompt"] == format_prompt("Good morrow, sir. How fares the king?")
    assert comp["replies"] == ["He is well, and sends you his kind regards.", "What is that to thee, knave?"]
    assert comp["tie"] is False and comp["source"] == f"{path}:1"
    assert comp["meta"] == {"rater": "panel-3", "checkpoint": "out/sft.pt", "temperature": 1.0}
    assert rank["prompt"] == ("\n\nHuman: Wilt thou forgive me?\n\nAssistant: For what offence?"
                              "\n\nHuman: I spoke in anger.\n\nAssistant:")                 # used as is
    assert rank["replies"][0] == "With all my heart, sweet friend." and len(rank["replies"]) == 3
    assert rank["meta"] == {"source": "chat.py"} and rank["source"] == f"{path}:2"
    assert rating["rating"] == 4.0 and rating["scale"] == [1.0, 5.0]
    assert rating["replies"] == ["Peace, and good tidings."]
    assert rating["source"] == f"{path}:4"                                           # line 3 is blank
    assert corr["replies"] == ["Nay, let us talk as friends.", "Ay, and I will kill thee."]
    assert sft_examples(recs) == [(format_prompt("Shall we fight?"), "Nay, let us talk as friends.")]
    assert all(r["prompt"].endswith(ASSISTANT) for r in recs)


def test_read_hh_rlhf_as_is():
    path = os.path.join(FIXTURES, "hh_rlhf_small.jsonl")
    recs, _ = read_feedback(path)
    with open(path) as f:
        raw = [json.loads(line) for line in f]
    assert len(recs) == len(raw) >= 8
    for rec, obj in zip(recs, raw):
        assert rec["kind"] == "comparison"
        assert rec["prompt"].startswith(HUMAN) and rec["prompt"].endswith(ASSISTANT)
        assert rec["prompt"] == rec["prompts"][0]
        for p, reply, whole in zip(rec["prompts"], rec["replies"], (obj["chosen"], obj["rejected"])):
            assert (p + " " + reply).rstrip() == whole                          # each transcript as it stands
    multi = recs[2]
    assert multi["prompt"] == ("\n\nHuman: I failed my exam.\n\nAssistant: I'm sorry. What happened?"
                               "\n\nHuman: I didn't study enough.\n\nAssistant:")
    assert multi["replies"][1] == "Then it's your own fault."
    # real HH-RLHF shapes: an empty chosen reply (saying nothing was preferred), and two conversations that
    # part before the last reply (each reply is scored after its own transcript)
    empty, parted = recs[-3], recs[-2]
    assert empty["replies"][0] == "" and empty["replies"][1].startswith("Yes, tell her") and not empty["tie"]
    assert parted["prompts"][0] != parted["prompts"][1] and not parted["tie"]
    assert parted["prompts"][1].endswith("Maybe.\n\nHuman: A recipe for bread.\n\nAssistant:")
    assert [r["tie"] for r in recs] == [False] * (len(recs) - 1) + [True]            # identical replies


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


GOOD = json.dumps({"kind": "comparison", "prompt": "Hi", "chosen": "Hello, friend.", "rejected": "Go away."})


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "fb.jsonl", [GOOD, GOOD, '{"kind": "comparison", "prompt": '])
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: not valid JSON")):
        read_feedback([path])
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\n\xff\xfe\n")                 # a BOM, then bad bytes
    with pytest.raises(ValueError, match=re.escape(f"{raw}:2: not UTF-8")):
        read_feedback(str(raw))


@pytest.mark.parametrize("obj, what", [
    ([1, 2], "expected a JSON object"),
    ({"kind": "vote", "prompt": "Hi"}, "unknown kind 'vote'"),
    ({"prompt": "Hi", "reply": "Yes."}, "no 'kind' field"),
    ({"kind": "comparison", "prompt": "Hi", "chosen": "Yes."}, "missing field 'rejected'"),
    ({"kind": "comparison", "prompt": "  ", "chosen": "Yes.", "rejected": "No."}, "field 'prompt' is empty"),
    ({"kind": "comparison", "prompt": "Hi", "chosen": 3, "rejected": "No."}, "'chosen' must be a string"),
    ({"kind": "comparison", "prompt": "Hi", "chosen": "Yes.", "rejected": "No.", "tie": "yes"}, "'tie'"),
    ({"kind": "ranking", "prompt": "Hi", "replies": ["Only one."]}, "at least 2"),
    ({"kind": "ranking", "prompt": "Hi", "replies": ["A.", "A."]}, "repeats a reply"),
    ({"kind": "rating", "prompt": "Hi", "reply": "Yes.", "rating": 6}, "not within scale [1, 5]"),
    ({"kind": "rating", "prompt": "Hi", "reply": "Yes.", "rating": 8, "scale": [0, 7]}, "not within scale"),
    ({"kind": "rating", "prompt": "Hi", "reply": "Yes.", "rating": True}, "finite number"),
    ({"kind": "rating", "prompt": "Hi", "reply": "Yes."}, "missing field 'rating'"),
    ({"kind": "correction", "prompt": "Hi", "reply": "Yes."}, "missing field 'corrected'"),
    ({"kind": "comparison", "prompt": "\n\nHuman: Hi", "chosen": "A.", "rejected": "B."}, "must end with"),
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: A.", "rejected": "Hi! B."}, "'rejected' is not a transcript"),
    ({"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hi\n\nAssistant: B."}, "'chosen' is not a transcript"),
])
def test_bad_records_name_file_line_and_problem(tmp_path, obj, what):
    path = write_lines(tmp_path / "fb.jsonl", [GOOD, json.dumps(obj)])
    with pytest.raises(ValueError) as e:
        read_feedback(path)
    assert str(e.value).startswith(f"{path}:2: ") and what in str(e.value)


def test_skip_bad_skips_and_counts(tmp_path):
    path = write_lines(tmp_path / "fb.jsonl", [GOOD, "not json", GOOD, json.dumps({"kind": "x"}), ""])
    errors = []
    with pytest.warns(UserWarning, match="skipped 2 bad"):
        recs, n_bad = read_feedback(path, skip_bad=True, errors=errors)
    assert n_bad == 2
    assert [r["source"] for r in recs] == [f"{path}:1", f"{path}:3"]
    assert [e.split(": ")[0] for e in errors] == [f"{path}:2", f"{path}:4"]


def test_empty_files_are_an_error(tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", [])
    blank = write_lines(tmp_path / "blank.jsonl", ["", "   "])
    with pytest.raises(ValueError, match="no feedback records"):
        read_feedback([empty, blank])
    only_bad = write_lines(tmp_path / "bad.jsonl", ["nope"])
    with pytest.raises(ValueError, match="no feedback records"), pytest.warns(UserWarning):
        read_feedback(only_bad, skip_bad=True)


def test_write_feedback_appends_and_checks(tmp_path):
    path = str(tmp_path / "sub" / "fb.jsonl")
    rec = {"kind": "rating", "prompt": "Quel temps fait-il ?", "reply": "Très beau, mon ami.", "rating": 5,
           "rater": "me"}
    write_feedback(path, rec)
    write_feedback(path, json.loads(GOOD))
    with pytest.raises(ValueError, match="missing field 'reply'"):
        write_feedback(path, {"kind": "rating", "prompt": "Hi", "rating": 3})
    with open(path, encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == [rec, json.loads(GOOD)]
    recs, _ = read_feedback(path)
    assert recs[0]["replies"] == ["Très beau, mon ami."] and recs[0]["meta"] == {"rater": "me"}
