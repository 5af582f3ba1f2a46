"""Tests for chat.py ([实战框架 §5.4.2], [实战框架 §3.4.3], [流程与实践 §3.2]): a scripted session through stdin that uses every command, the
feedback file it writes (checked record by record, read back by data.feedback.read_feedback, and trained on by
train_rm.py), the context-window trimming, Ctrl-C during a reply, and the missing-checkpoint error.
Tiny random models (1 layer, d = 32): replies are gibberish, but every code path runs for real."""
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch

import chat
from chat import (Chat, ReplyStream, printable, Settings, clean_reply, knob_named, parse_choice, parse_order,
                  stream_reply, trim_history, truncate_message)
from model import GPT, GPTConfig
from data.prepare import EOT, format_prompt, get_tokenizer
from data.plumbing import save_checkpoint
from data.feedback import read_feedback
from reward import RewardModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
CFG = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=128)




@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny SFT-format checkpoint and a reward model of the same shape."""
    d = tmp_path_factory.mktemp("chat")
    torch.manual_seed(0)
    model = GPT(CFG)
    save_checkpoint({"model": model.state_dict(), "model_args": asdict(CFG), "kind": "sft"}, str(d / "sft.pt"))
    save_checkpoint(RewardModel(CFG).checkpoint_dict(), str(d / "rm.pt"))
    return d


def run_chat(args, stdin="", timeout=60):
    return subprocess.run([sys.executable, "chat.py", *args], input=stdin, capture_output=True, text=True,
                          cwd=ROOT, env=ENV, timeout=timeout, encoding="utf-8")


# ---------------------------------------------------------------------------------------------------- session

MSG1, MSG2 = "Good morrow, sir. How dost thou?", "What news from Rome?"
FIX = "Nay, let us talk as friends."
LONG = " ".join(["gentle"] * 2000)
SCRIPT = [
    "/rate 3",                 # no reply yet: explained, nothing saved
    "/fix",                    # no reply yet: must NOT read the next line as a correction
    "/temp -1",                # invalid: the records below still carry temperature 0.8
    MSG1,
    "/compare", "1",
    "/compare", "tie",
    "/rank 3", "2 1 3",
    "/rate 4",
    "/fix", FIX,
    "/temp 0.5", "/topk 10", "/topp 0.9", "/max 20",
    MSG2,
    "/rate 2",                 # the reply to MSG2: new settings, and the transcript holds the correction
    "/rank x", "/rate 9", "/foo", "/compare 3",
    "/reset",
    "/rate 5",                 # the conversation is gone: nothing to rate
    "/help",
    LONG,                      # far longer than the context window: truncated with a notice
]


@pytest.fixture(scope="module")
def session(ckpts):
    fb = ckpts / "feedback.jsonl"
    args = ["--ckpt", str(ckpts / "sft.pt"), "--rm", str(ckpts / "rm.pt"), "--feedback", str(fb), "--seed", "7"]
    proc = run_chat(args, "\n".join(SCRIPT) + "\n")
    return proc, fb


def candidates(out):
    """The numbered replies each /compare or /rank showed: a list of lists of one-line texts."""
    groups, cur = [], None
    for line in out.splitlines():
        m = re.match(r"\[(\d)\] (.*)$", line)
        if m:
            if m.group(1) == "1":
                cur = []
                groups.append(cur)
            cur.append(m.group(2))
    return groups


def one_line(text):
    """A reply as the scripted output shows it: control characters made printable, on one line."""
    from chat import printable
    return " ".join(printable(text).split())


def test_scripted_session_output(session):
    proc, _ = session
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "\x1b" not in out and "You:" not in out and "Traceback" not in proc.stderr
    assert proc.stderr == ""                                                  # no warnings either
    # three replies: to MSG1, MSG2 and the long message, each on a line starting "Bard:"
    assert len(re.findall(r"^Bard:", out, re.M)) == 3
    assert [len(g) for g in candidates(out)] == [2, 2, 3]
    # the reward model's scores after each /compare and /rank, with its verdict
    rm_lines = [l for l in out.splitlines() if l.startswith("* reward model scores:")]
    assert len(rm_lines) == 3
    assert re.search(r"\[1\] [+-]\d\.\d{3}  \[2\] [+-]\d\.\d{3} \(it (agrees|disagrees) with you\)", rm_lines[0])
    assert "you called it a tie" in rm_lines[1]
    assert re.search(r"its order [123] [123] [123] agrees with yours on [0-3] of 3 pairs", rm_lines[2])
    # every bad command was explained and changed nothing
    assert out.count("there is no reply to rate yet") == 2                    # before MSG1 and after /reset
    assert "there is no reply to correct yet" in out
    assert "temperature must be a number >= 0" in out
    assert "/rank needs the number of replies K" in out
    assert "/rate needs a whole number from 1 to 5" in out
    assert "unknown command '/foo'" in out and "/compare takes no arguments" in out
    assert out.count("commands:\n  /compare") == 2                            # /help and after /foo
    for line in ("temperature = 0.5", "top_k = 10", "top_p = 0.9", "max_new_tokens = 20"):
        assert "* " + line in out
    assert re.search(r"your message is \d{4} tokens, more than fit in the context window .*kept its beginning", out)
    assert out.rstrip().endswith("* bye: 6 feedback record(s) saved to " + str(session[1]) + " in this session")


def test_scripted_session_feedback_records(session, ckpts):
    proc, fb = session
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(l) for l in fb.read_text(encoding="utf-8").splitlines()]
    assert [r["kind"] for r in lines] == ["comparison", "comparison", "ranking", "rating", "correction", "rating"]
    cmp1, cmp2, rank, rate4, corr, rate2 = lines
    shown = candidates(proc.stdout)
    p1 = format_prompt([MSG1])
    assert [r["prompt"] for r in lines[:5]] == [p1] * 5
    # /compare + 1: reply 1 chosen; /compare + tie: kept as a tie, reply 1 first
    assert (one_line(cmp1["chosen"]), one_line(cmp1["rejected"])) == (shown[0][0], shown[0][1])
    assert cmp1["tie"] is False and cmp2["tie"] is True
    assert (one_line(cmp2["chosen"]), one_line(cmp2["rejected"])) == (shown[1][0], shown[1][1])
    # /rank 3 + "2 1 3": best first
    assert [one_line(r) for r in rank["replies"]] == [shown[2][1], shown[2][0], shown[2][2]]
    # the best ranked reply became the Bard's reply: /rate and /fix are about it
    assert rate4["reply"] == rank["replies"][0] and rate4["rating"] == 4 and rate4["scale"] == [1, 5]
    assert corr["reply"] == rank["replies"][0] and corr["corrected"] == FIX
    # the correction replaced the reply in the transcript the model saw next
    reply2 = rate2["reply"]
    assert rate2["prompt"] == format_prompt([MSG1, FIX, MSG2]) and rate2["rating"] == 2
    assert re.search(r"^Bard: " + re.escape(reply2.split()[0]), proc.stdout, re.M)
    # where each record came from, and the sampling settings of the reply it judges
    for r in lines:
        assert r["checkpoint"] == str(ckpts / "sft.pt") and r["source"] == "chat.py"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", r["timestamp"])
    for r in lines[:5]:
        assert (r["temperature"], r["top_k"], r["top_p"], r["max_new_tokens"]) == (0.8, 50, 0.95, 64)
    assert (rate2["temperature"], rate2["top_k"], rate2["top_p"], rate2["max_new_tokens"]) == (0.5, 10, 0.9, 20)
    assert rate4["interrupted"] is False and corr["interrupted"] is False
    assert len(cmp1["rm_scores"]) == 2 and len(rank["rm_scores"]) == 3 and rank["rm"] == str(ckpts / "rm.pt")
    # the reader accepts every line; the extra keys are kept under "meta"
    records, skipped = read_feedback(str(fb))
    assert skipped == 0 and [r["kind"] for r in records] == [r["kind"] for r in lines]
    assert [r["tie"] for r in records] == [False, True, False, False, False, False]
    assert records[4]["replies"] == [FIX, corr["reply"]]                     # corrected > original
    assert records[2]["replies"] == rank["replies"]
    assert records[0]["meta"]["source"] == "chat.py" and records[5]["meta"]["temperature"] == 0.5


def test_train_rm_learns_from_chat_feedback(session, ckpts, tmp_path):
    """The file chat.py wrote is training data for train_rm.py (its own out_dir, so the fixture's rm.pt stays)."""
    _, fb = session
    shutil.copy(ckpts / "sft.pt", tmp_path / "sft.pt")
    proc = subprocess.run([sys.executable, "train_rm.py", "--data", str(fb), "--out_dir", str(tmp_path),
                           "--epochs", "1", "--n_heldout", "4", "--k", "2", "--max_new_tokens", "8",
                           "--eval_interval", "1"], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "read 6 feedback records" in proc.stdout
    assert "comparison=2, ranking=1, rating=2, correction=1" in proc.stdout
    assert (tmp_path / "rm.pt").exists()
    rm = RewardModel.from_checkpoint(torch.load(tmp_path / "rm.pt", weights_only=True))
    assert rm.reward_std > 0


def test_missing_checkpoint_names_the_script(tmp_path, capsys):
    """main() in this process: a fresh interpreter costs seconds of torch import, and the scripted session
    above already shows that main()'s return value is the exit status of `python chat.py`."""
    assert chat.main(["--ckpt", str(tmp_path / "nowhere" / "sft.pt")]) == 1
    out, err = capsys.readouterr()
    assert "train_sft.py" in err and "not found" in err and out == ""


def test_bad_rm_bad_settings_and_help(ckpts, tmp_path, capsys):
    assert chat.main(["--ckpt", str(ckpts / "sft.pt"), "--rm", str(tmp_path / "rm.pt")]) == 1
    assert "train_rm.py" in capsys.readouterr().err                          # an explicit --rm must exist
    assert chat.main(["--ckpt", str(ckpts / "sft.pt"), "--rm", "none", "--max_new_tokens", "100"]) == 1
    assert "max_new_tokens must be a whole number from 1 to 64" in capsys.readouterr().err
    assert chat.main(["--ckpt", str(ckpts / "rm.pt"), "--rm", "none", "--max_new_tokens", "99"]) == 1  # rm.pt's body
    assert "max_new_tokens must be a whole number from 1 to 64" in capsys.readouterr().err             # loads
    with pytest.raises(SystemExit) as e:                                     # a knob's range: refused before loading
        chat.main(["--ckpt", str(ckpts / "rm.pt"), "--rm", "none", "--top_p", "0"])
    assert e.value.code == 2 and "--top_p must be in (0, 1], got 0.0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        chat.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--ckpt", "--rm", "--feedback", "--temperature", "--top_k", "--top_p", "--max_new_tokens", "--seed"):
        assert flag in out
    assert "/compare" in out and "What it simplifies" in out                 # the docstring, commands and all


# ---------------------------------------------------------------------------------------------------- units

def test_trim_history_drops_the_oldest_exchanges():
    enc = get_tokenizer()
    turns = []
    for i in range(6):
        turns += [f"Question number {i}: what say you, good sir, of the weather?", f"Answer {i}: fair and mild."]
    turns.append("And now the last question?")
    room = 60
    kept, dropped = trim_history(enc, turns, room)
    assert len(enc.encode_ordinary(format_prompt(kept))) <= room
    assert dropped % 2 == 0 and dropped > 0 and kept == turns[dropped:]      # whole exchanges, oldest first
    assert kept[-1] == "And now the last question?" and len(kept) % 2 == 1  # still starts with a human turn
    # as few as possible: keeping one more exchange would not fit
    assert len(enc.encode_ordinary(format_prompt(turns[dropped - 2:]))) > room
    assert trim_history(enc, turns, 10_000) == (turns, 0)                    # fits: unchanged
    assert trim_history(enc, ["a " * 100], 20) == (["a " * 100], 0)         # the last message is never dropped


def test_truncate_message_keeps_the_beginning():
    enc = get_tokenizer()
    text = " ".join(f"word{i}" for i in range(300))
    cut, n = truncate_message(enc, text, 50)
    assert n == len(enc.encode_ordinary(" " + text)) and n > 50
    assert len(enc.encode_ordinary(format_prompt([cut]))) <= 50
    assert text.startswith(cut) and cut.startswith("word0 word1")
    assert len(enc.encode_ordinary(format_prompt([text[:len(cut) + 7].strip()]))) > 50   # the longest that fits
    assert truncate_message(enc, "  short  ", 50) == ("short", 0)
    cut, n = truncate_message(enc, "é" * 200, 30)                            # multi-byte characters
    assert n > 0 and set(cut) == {"é"}


class InterruptAfter(io.StringIO):
    """A terminal whose user presses Ctrl-C after `n` writes (the writes happen in generate's on_token)."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def write(self, s):
        if self.n == 0:
            raise KeyboardInterrupt
        self.n -= 1
        return super().write(s)


def streaming_setup():
    """Tokenizer, a tiny random model, pure-sampling chat settings, and one prompt's token ids."""
    enc = get_tokenizer()
    torch.manual_seed(1)
    model = GPT(CFG).eval()
    s = Settings(max_new_tokens=30, top_k=0, top_p=1.0, temperature=1.0)
    return enc, model, s, enc.encode_ordinary(format_prompt(["Speak, friend."]))


def test_ctrl_c_keeps_the_partial_reply():
    enc, model, s, ids = streaming_setup()
    full_out = io.StringIO()
    full, interrupted = stream_reply(model, enc, ids, s, torch.Generator().manual_seed(3), full_out)
    assert not interrupted and full and full_out.getvalue().strip() == printable(full)
    out = InterruptAfter(5)
    part, interrupted = stream_reply(model, enc, ids, s, torch.Generator().manual_seed(3), out)
    assert interrupted and part and full.startswith(part) and len(part) < len(full)
    assert out.getvalue().strip() == printable(part)                         # what was shown is what is kept
    assert model.training is False                                           # generate() restored the mode
    # and the program goes on: the next reply works
    again, interrupted = stream_reply(model, enc, ids, s, torch.Generator().manual_seed(3), io.StringIO())
    assert again == full and not interrupted


class SigintAfter(io.StringIO):
    """A terminal whose user presses Ctrl-C (a real SIGINT to this process) after `n` writes."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def write(self, s):
        self.n -= 1
        if self.n == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return super().write(s)


def test_sigint_stops_the_reply_between_tokens():
    """Ctrl-C only sets a flag; the reply stops at the next token, with exactly the text shown so far."""
    enc, model, s, ids = streaming_setup()
    full, _ = stream_reply(model, enc, ids, s, torch.Generator().manual_seed(3), io.StringIO())
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, even under nohup
    try:
        out = SigintAfter(4)
        part, interrupted = stream_reply(model, enc, ids, s, torch.Generator().manual_seed(3), out)
        assert interrupted and out.getvalue().strip() == printable(part) and full.startswith(part)
        assert len(part) < len(full)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # Ctrl-C works as before again
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_stream_decodes_multibyte_characters_and_stops_at_a_blank_line():
    enc = get_tokenizer()
    out = io.StringIO()
    stream = ReplyStream(enc, out)
    byte_tokens = [enc.encode_single_token(bytes([b])) for b in " é".encode()]   # 'é' split over 2 tokens
    for t in byte_tokens + enc.encode_ordinary(" fair\nday") + [EOT]:
        stream(0, torch.tensor([t]))
    stream.finish()
    assert stream.text == " é fair\nday" and out.getvalue() == "é fair\nday"      # "Bard: " has the space
    out, stream = io.StringIO(), ReplyStream(enc, io.StringIO())
    stream.out = out
    with pytest.raises(Exception) as e:
        for t in enc.encode_ordinary(" Farewell.\n\nHuman: and more"):
            stream(0, torch.tensor([t]))
    assert type(e.value).__name__ == "_EndOfTurn" and out.getvalue() == "Farewell."
    assert clean_reply(" Farewell.\n\nHuman: x ") == "Farewell."


def test_answers_and_settings_are_validated():
    assert parse_choice("1") == 0 and parse_choice(" 2 ") == 1 and parse_choice("TIE") == "tie"
    assert parse_order("3 1 2", 3) == [2, 0, 1] and parse_order("2,1", 2) == [1, 0] and parse_order("312", 3) == [2, 0, 1]
    for bad in ("x", "1 1 2", "1 2", "1 2 3 4", "0 1 2", "4 1 2"):
        with pytest.raises(ValueError, match="best first"):
            parse_order(bad, 3)
    for bad in ("3", "", "both"):
        with pytest.raises(ValueError):
            parse_choice(bad)
    # the sampling knobs: a command each (or an unambiguous beginning), checked by sample.sampling_args
    assert [knob_named(c) for c in ("/temp", "/topk", "/top_p", "/max", "/max_new_tokens", "/t", "/top", "/x")] == \
        ["temperature", "top_k", "top_p", "max_new_tokens", "max_new_tokens", None, None, None]
    out = io.StringIO()
    c = Chat(GPT(CFG), get_tokenizer(), Settings(), "sft.pt", term=chat.Terminal(False, out))
    for cmd in ("/temp 0", "/topp 1", "/topk 0", "/max 64"):
        c.handle(cmd)
    assert (c.s.temperature, c.s.top_p, c.s.top_k, c.s.max_new_tokens) == (0.0, 1.0, 0, 64)
    for cmd, name in [("/temp -1", "temperature"), ("/temp nan", "temperature"), ("/temp hot", "temperature"),
                      ("/topk -2", "top_k"), ("/topk 2.5", "top_k"), ("/topp 0", "top_p"), ("/topp 1.5", "top_p"),
                      ("/max 0", "max_new_tokens"), ("/max 65", "max_new_tokens")]:
        out.truncate(0), out.seek(0)
        c.handle(cmd)
        assert out.getvalue().startswith(f"* {name} must be") and "nothing changed" in out.getvalue(), cmd
    assert (c.s.temperature, c.s.top_p, c.s.top_k, c.s.max_new_tokens) == (0.0, 1.0, 0, 64)     # unchanged
