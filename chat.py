"""
Talk to the Bard, and be the human in RLHF ([实战框架 §5.4.2] 人机交互; [实战框架 §3.4.3] 实时反馈处理).

    python chat.py                                   # out/ppo.pt if it exists, else out/sft.pt
    python chat.py --ckpt out/sft.pt --temperature 0.7
    python chat.py < questions.txt                   # scripted: stdin is not a terminal (see below)
    python train_rm.py --data out/feedback.jsonl --mix_panel   # the reward model learns from what you said
    python chat.py --help                            # every setting below is a --flag

A multi-turn chat in the format the models were trained on (data.prepare.format_prompt, HH-RLHF:
"\\n\\nHuman: ...\\n\\nAssistant: ..."), each reply streamed token by token. The four kinds of feedback of
[流程与实践 §3.2] 人类反馈收集 are one command each, every record appended at once (fsynced) to
out/feedback.jsonl in the schema of data/README.md (train_rm.py --data): the transcript the model saw is
its prompt; the checkpoint, sampling settings, reward model's scores, a timestamp and "source": "chat.py"
go with it (under "meta" in data.feedback.read_feedback).

Commands (/help lists them): /compare (two new replies to your last message; answer 1, 2 or tie), /rank K
(K new replies, 2..9; answer their order best first, e.g. 3 1 2), /rate N (the last reply, 1 bad .. 5
good), /fix (then type a better reply); /temperature X, /top_k K, /top_p P, /max_new_tokens N (the knobs
of sample.Sampling, also by any unambiguous beginning: /temp 0.7, /topk 40, /max 20; /temp 0 is greedy);
/reset, /help, /exit. The reply you prefer (a tie: reply 1), or your /fix text, becomes the reply in the
transcript. A reward model's (out/rm.pt, or --rm PATH) scores are shown AFTER you answer: no swaying.

Scripted mode (stdin is not a terminal): each line is a message, a command, or the answer the previous
command asks for (a bad answer cancels it). No prompts, no colours: replies start with "Bard: ", /compare
and /rank list "[1] ..." one line each, the commands' messages start with "* ".
Ctrl-C while the Bard talks stops the reply, kept and marked [interrupted] (its feedback records
"interrupted": true); at the prompt Ctrl-C or Ctrl-D ends the chat. A feedback path that cannot be
written is refused before the chat starts, not after you have given your feedback.

What it simplifies:
  - the context window (block_size - max_new_tokens prompt tokens): the oldest exchanges are dropped,
    whole; a message too long to fit alone keeps its BEGINNING (people put what they mean first;
    data/prepare.py keeps a prompt's end: a play's speech leads up to the next one);
  - a reply ends at <|endoftext|> or a blank line ("\\n\\n", the turn separator); no repetition penalty;
  - /compare and /rank leave out repeated replies and draw again, up to REDRAWS times;
  - feedback is always on the last reply; one person, one model, no undo (edit the JSONL file if you must).
"""
if __name__ == "__main__":    # Ctrl-C while the imports below load (a second or two): one line, status 130
    import os
    import signal
    signal.signal(signal.SIGINT, lambda *_: (os.write(2, b"\ninterrupted (Ctrl-C) while starting\n"),
                                             os._exit(130)))
import codecs
import contextlib
import dataclasses
import json
import os
import re
import signal
import sys
import threading
from datetime import datetime, timezone

import torch

from data.feedback import check_writable, write_feedback
from data.prepare import EOT, format_prompt, get_tokenizer
from data.plumbing import flag, load_checkpoint, parse_settings
from reward import RewardModel, reply_scores
from sample import Sampling, decode_replies, encode_prompt, generate, load_model, sampling_args


@dataclasses.dataclass
class Settings(Sampling):
    ckpt: str = flag("", "", "checkpoint to talk to; empty = out/ppo.pt if it exists, else out/sft.pt")
    rm: str = flag("", "",
                   "reward model scoring /compare and /rank; empty = out/rm.pt if it exists; none = off")
    feedback: str = flag("out/feedback.jsonl", "",
                         "your feedback is appended here, a JSON line each (for train_rm)")
    seed: int = flag(1337, ">= 0", "random seed: the same seed and the same input give the same chat")
    device: str = flag("auto", "", "auto | cpu | cuda | cuda:N: where the models run")
    # the class in the browser (data/classroom.py)
    serve: bool = flag(False, "", "serve the class's web pages instead of chatting in the terminal")
    host: str = flag("127.0.0.1", "", "--serve: the address to listen on (0.0.0.0: the classroom network)")
    port: int = flag(8000, "[0, 65535]", "--serve: the port (0: any free one)")
    class_code: str = flag("", "", "--serve: the code students type (empty: a new random one)")
    class_file: str = flag("out/class.jsonl", "", "--serve: the class's labels, JSONL for train_rm.py --data")
    replies: int = flag(2, "[2, 9]", "--serve: replies per task: 2 make a comparison, more a ranking")


KNOBS = [f.name for f in dataclasses.fields(Sampling)]   # each sampling knob is a command: /temperature 0.7
SCALE = [1, 5]          # /rate's scale
MAX_RANK = 9            # /rank K takes 2 <= K <= 9: one digit per reply when typing the order
REDRAWS = 3             # /compare and /rank draw again (at most this often) when replies repeat
HELP = "\n".join(["commands:"] + [f"  {cmd:<20}{what}" for cmd, what in [
    ("/compare", "two replies to your last message; choose 1, 2 or tie (a comparison)"),
    ("/rank K", "K replies (2..9); type their order best first, e.g. 3 1 2 (a ranking)"),
    ("/rate N", "rate the last reply from 1 (bad) to 5 (good) (a rating)"),
    ("/fix", "then type a corrected reply; it replaces the last reply (a correction)"),
    *[(f"/{f.name} X", f.metadata["help"]) for f in dataclasses.fields(Sampling)],
    ("/reset", "forget the conversation"), ("/help", "this list"),
    ("/exit", "leave (Ctrl-D or Ctrl-C at the prompt too)")]]
    + ["the sampling commands also work by any unambiguous beginning (/temp 0.7, /topk 40, /max 20);",
       "anything else is a message to the Bard"])


def knob_named(cmd):
    """The knob a command names in full or by an unambiguous beginning, underscores optional; else None."""
    typed = cmd.lstrip("/").replace("_", "")
    found = [k for k in KNOBS if k.replace("_", "").startswith(typed)] if typed else []
    return found[0] if len(found) == 1 else None


# The context window: the prompt is the whole transcript, in room = block_size - max_new_tokens tokens.

def n_tokens(enc, turns):
    return len(encode_prompt(enc, turns))


def truncate_message(enc, text, room):
    """The longest BEGINNING of a human message whose format_prompt([text]) fits in `room` tokens.
    Returns (text, n): n is the message's length in tokens if it was cut, else 0."""
    text = text.strip()
    if n_tokens(enc, [text]) <= room:
        return text, 0
    toks = enc.encode_ordinary(" " + text)
    for keep in range(min(len(toks), room), 0, -1):
        # decode_bytes + errors="ignore": a cut through a multi-byte character drops its first bytes
        cut = enc.decode_bytes(toks[:keep]).decode("utf-8", errors="ignore").strip()
        if n_tokens(enc, [cut]) <= room:
            return cut, len(toks)
    raise ValueError(f"no room for a message in {room} tokens")


def trim_history(enc, turns, room):
    """Drop the oldest exchanges (human turn + reply) until `turns` (ending with a human turn, which always
    stays) fit in `room` tokens. Returns (kept turns, number of turns dropped)."""
    turns, dropped = list(turns), 0
    while len(turns) > 1 and n_tokens(enc, turns) > room:
        turns, dropped = turns[2:], dropped + 2
    return turns, dropped


# Replies

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")   # control characters except \t and \n


def printable(text):
    """A model can emit any byte, escape sequences included: never send those to the terminal."""
    return _CONTROL.sub("\ufffd", text)


def clean_reply(text):
    """A reply ends at a blank line (the turn separator of a transcript), without surrounding spaces."""
    return text.split("\n\n")[0].strip()


class _EndOfTurn(Exception):
    """Raised from the streaming callback when the reply reaches a blank line: stops generate()."""


class ReplyStream:
    """generate()'s on_token for one reply (B = 1): writes the new text. The incremental UTF-8 decoder keeps
    a token's part of a character (BPE works on bytes) until it is whole. Leading spaces are not shown and a
    trailing newline is held back (it may start the blank line that ends the reply). `stop` (set by
    Ctrl-C) ends the reply at the next token."""

    def __init__(self, enc, out):
        self.enc, self.out, self.stop = enc, out, False
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.shown = "", ""                                        # decoded so far; written so far

    def show(self):
        visible = self.text.rstrip("\n").lstrip()                             # always extends self.shown
        self.out.write(printable(visible[len(self.shown):]))
        self.out.flush()
        self.shown = visible

    def __call__(self, step, tokens):                                         # tokens (1,): this step's token
        if self.stop:
            raise KeyboardInterrupt
        t = int(tokens[0])
        if t == EOT:
            return
        new = self.decoder.decode(self.enc.decode_single_token_bytes(t))
        self.text, *after = (self.text + new).split("\n\n", 1)             # after: what follows a blank line
        self.show()
        if after:
            raise _EndOfTurn

    def finish(self):
        self.text += self.decoder.decode(b"", final=True)                     # an unfinished character
        self.show()


def stream_reply(model, enc, prompt_ids, s, generator, out):
    """One reply to prompt_ids, written to `out` as it is sampled. Returns (reply, interrupted).
    Ctrl-C only sets a flag, turned into a KeyboardInterrupt at the next token: one at an arbitrary moment
    could fall between writing text and counting it as shown, and the reply kept would not be the one seen."""
    stream = ReplyStream(enc, out)
    main_thread = threading.current_thread() is threading.main_thread()      # where signal handlers live
    if main_thread:
        old = signal.signal(signal.SIGINT, lambda signum, frame: setattr(stream, "stop", True))
    try:
        generate(model, [prompt_ids], s.max_new_tokens, **sampling_args(s, model.config.block_size),
                 generator=generator, on_token=stream)
    except _EndOfTurn:
        pass
    except KeyboardInterrupt:
        return clean_reply(stream.shown), True
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, old if old is not None else signal.default_int_handler)
    stream.finish()
    return clean_reply(stream.text), False


def sample_replies(model, enc, prompts_ids, s, generator):
    """One reply to each prompt (lists of token ids), in one batch, not streamed."""
    seq, pad, resp_mask = generate(model, prompts_ids, s.max_new_tokens,
                                   **sampling_args(s, model.config.block_size), generator=generator)
    return [clean_reply(r) for r in decode_replies(enc, seq, resp_mask)]


def rm_scores(rm, enc, turns, replies):
    """The reward model's normalised score of each reply after the transcript `turns`; None without one."""
    if rm is None:
        return None
    with torch.no_grad():
        return reply_scores(rm, enc, [format_prompt(turns)] * len(replies), replies, normalised=True).tolist()


def parse_choice(text):
    """/compare's answer: '1' -> 0, '2' -> 1, 'tie' -> "tie"."""
    t = text.strip().lower()
    if t in ("1", "2"):
        return int(t) - 1
    if t in ("tie", "t", "="):
        return "tie"
    raise ValueError(f"answer 1, 2 or tie, not {text.strip()!r}")


def parse_order(text, k):
    """/rank's answer: the reply numbers best first, e.g. '3 1 2' (or '312', '3,1,2') -> [2, 0, 1]."""
    parts = text.replace(",", " ").split()
    if len(parts) == 1 and len(parts[0]) == k:
        parts = list(parts[0])                                                # '312'
    try:
        order = [int(p) - 1 for p in parts]
    except ValueError:
        order = []
    if sorted(order) != list(range(k)):
        raise ValueError(f"type each of the numbers 1..{k} once, best first (e.g. "
                         f"{' '.join(str(i) for i in range(k, 0, -1))}), not {text.strip()!r}")
    return order


def rm_verdict(scores, order=None, tie=False):
    """The reward model's scores, and whether it orders the replies as the human did (order: reply indices
    best first; None if the human gave none)."""
    line = "reward model scores: " + "  ".join(f"[{i + 1}] {x:+.3f}" for i, x in enumerate(scores))
    if order is None:
        return line
    if tie:
        return line + f" (you called it a tie; it puts them {abs(scores[0] - scores[1]):.3f} apart)"
    pairs = [(a, b) for i, a in enumerate(order) for b in order[i + 1:]]   # a ranked above b by the human
    agree = sum(scores[a] > scores[b] for a, b in pairs)
    if len(order) == 2:
        return line + (" (it agrees with you)" if agree else " (it disagrees with you)")
    rm_order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return line + (f"; its order {' '.join(str(i + 1) for i in rm_order)} agrees with yours on "
                   f"{agree} of {len(pairs)} pairs")


# The terminal: lines in, text out; prompts and colours only when a person is typing

class Terminal:
    def __init__(self, interactive, out=None):
        self.interactive, self.out = interactive, out or sys.stdout
        self.color = interactive and self.out.isatty() and "NO_COLOR" not in os.environ

    def paint(self, text, code):
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def say(self, text, color=None):
        text = printable(text)                                                # then the colour codes
        print(self.paint(text, color) if color else text, file=self.out, flush=True)

    def info(self, text):
        self.say("* " + text, "2")                                            # dim

    def read(self, prompt):
        """One line, stripped, non-UTF-8 bytes replaced by U+FFFD (anything typed can be saved); None at the
        end of input or on Ctrl-C."""
        try:
            if not self.interactive:
                line = sys.stdin.readline()
                if not line:
                    return None                                          # end of input
            elif self.color:  # \001 \002 tell readline the colour codes take no room on the screen
                line = input(f"\001\033[1;32m\002{prompt}\001\033[0m\002")
            else:
                line = input(prompt)
        except (EOFError, KeyboardInterrupt):
            if self.interactive:
                print(file=self.out)
            return None
        return line.encode("utf-8", "surrogateescape").decode("utf-8", "replace").strip()

    def ask(self, prompt, parse):
        """parse(answer), or None if cancelled (and said so): an empty line, or a bad answer in scripted mode
        (a terminal asks again)."""
        while True:
            line = self.read(prompt)
            if not line:                                                      # None, or an empty line
                break
            try:
                return parse(line)
            except ValueError as e:
                self.info(str(e))
                if not self.interactive:
                    break
        self.info("cancelled: nothing saved, the transcript is unchanged")


# The chat: the conversation, the settings, and the loop

class Chat:
    def __init__(self, model, enc, s, ckpt_path, rm=None, rm_path=None, term=None):
        self.model, self.enc, self.s, self.ckpt_path = model, enc, s, ckpt_path
        self.rm, self.rm_path = rm, rm_path
        self.term = term or Terminal(interactive=False)
        self.generator = torch.Generator(device=model.wte.weight.device).manual_seed(s.seed)
        self.turns = []            # the transcript: human, assistant, human, assistant, ...
        self.reply_info = {}       # how the last reply was made: sampling settings, interrupted, edited
        self.saved = 0             # feedback records written in this session

    def run(self):
        term = self.term
        if term.interactive:
            term.info(f"talking to {self.ckpt_path} ({self.model.num_params() / 1e6:.1f}M parameters); "
                      f"feedback goes to {self.s.feedback}")
            term.info(f"reward model: {self.rm_path}" if self.rm is not None else
                      "no reward model (out/rm.pt, made by train_rm.py): /compare and /rank show no scores")
            term.info("/help lists the commands; Ctrl-D or /exit to leave")
        while True:
            line = term.read("You: ")
            if line is None:
                break
            try:
                if line and not self.handle(line):
                    break
            except KeyboardInterrupt:  # Ctrl-C while sampling /compare or /rank replies
                print(file=term.out)
                term.info("cancelled: nothing saved")
        term.info(f"bye: {self.saved} feedback record(s) saved to {self.s.feedback} in this session"
                  if self.saved else "bye")
        return 0

    def handle(self, line):
        """One line from the human; False ends the chat."""
        if not line.startswith("/"):
            self.chat(line)
            return True
        cmd, *args = line.split()
        cmd = cmd.lower()
        if cmd in ("/exit", "/quit"):
            return False
        if cmd in FEEDBACK:
            allowed, missing, usage, run = FEEDBACK[cmd]
            if " ".join(args) not in allowed:
                self.term.info(f"{usage} (got {line!r}); nothing changed")
            elif not self.turns:
                self.term.info(f"there is {missing} yet: say something first; nothing changed")
            else:
                run(self, *map(int, args))
        elif cmd == "/help":
            self.term.say(HELP)
        elif cmd == "/reset":
            self.turns, self.reply_info = [], {}
            self.term.info("the conversation is forgotten; say something new")
        elif knob_named(cmd):
            self.set(knob_named(cmd), args)
        else:
            self.term.info(f"unknown command {cmd!r}; nothing changed")
            self.term.say(HELP)
        return True

    def set(self, name, args):
        """/temperature 0.7 etc.: one sampling knob, checked by sample.sampling_args like a --flag."""
        if len(args) != 1:
            self.term.info(f"{name} is {getattr(self.s, name)}; to change it give one value, e.g. "
                           f"/{name} {getattr(self.s, name)}")
            return
        kind = type(getattr(Sampling(), name))                                # int or float
        try:
            if kind is int and not re.fullmatch(r"[+-]?\d+", args[0]):
                raise ValueError(f"{name} must be a whole number, got {args[0]!r}")
            try:
                value = kind(args[0])
            except ValueError:
                raise ValueError(f"{name} must be a number, got {args[0]!r}") from None
            new = dataclasses.replace(self.s, **{name: value})
            sampling_args(new, self.model.config.block_size)                  # the knobs' rules, in sample.py
        except ValueError as e:
            self.term.info(f"{e}; nothing changed")
            return
        self.s = new
        self.term.info(f"{name} = {value}")

    def fit(self, turns):
        """Fit a transcript ending with a human turn in the context window (notices say what went)."""
        room = self.model.config.block_size - self.s.max_new_tokens           # prompt tokens that fit
        turns, dropped = trim_history(self.enc, turns, room)
        if dropped:
            self.term.info(f"the conversation outgrew the context window: forgot its {dropped // 2} oldest "
                           "exchange(s)")
        last, n = truncate_message(self.enc, turns[-1], room)
        if n:
            self.term.info(f"your message is {n} tokens, more than fit in the context window ({room} "
                           f"tokens = block_size {self.model.config.block_size} - max_new_tokens "
                           f"{self.s.max_new_tokens}, with the chat markers): kept its beginning, "
                           f"{len(self.enc.encode_ordinary(' ' + last))} tokens")
        return turns[:-1] + [last]

    def chat(self, message):
        turns = self.fit(self.turns + [message])
        out = self.term.out
        out.write(self.term.paint("Bard:", "1;34") + " ")
        out.flush()
        ids = encode_prompt(self.enc, turns)
        reply, interrupted = stream_reply(self.model, self.enc, ids, self.s, self.generator, out)
        if interrupted:
            out.write(" [interrupted]" if reply else "[interrupted]")
        elif not reply:
            out.write("(an empty reply)")
        print(file=out, flush=True)
        self.turns = turns + [reply]
        self.reply_info = {**self.settings(), "interrupted": interrupted}

    def settings(self):
        return {k: getattr(self.s, k) for k in KNOBS}

    def save(self, record, extra, detail):
        """Append a record, with where it came from (under "meta" for train_rm.py), to the feedback file
        (write_feedback checks the schema, mends a cut-short last line, fsyncs): "saved a {kind}{detail}"."""
        record = {**record, "checkpoint": self.ckpt_path, **extra,
                  "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "source": "chat.py"}
        try:
            healed = write_feedback(self.s.feedback, record)
        except (ValueError, OSError) as e:
            self.term.info(f"NOT saved ({e}); your feedback is this line, to keep by hand: "
                           f"{json.dumps(record)}")
            return
        if healed:
            self.term.info(healed)
        self.saved += 1
        self.term.info(f"saved a {record['kind']}{detail}")


# The feedback commands ([流程与实践 §3.2]): comparison, ranking, rating, correction

def offer(chat, k, ranking):
    """/compare (k = 2) and /rank k: k fresh replies to the last human message; the human orders them and
    the best becomes the reply in the transcript."""
    what, term = "rank" if ranking else "compare", chat.term
    if chat.s.temperature == 0:
        term.info(f"with /temp 0 (greedy) every reply is the same: set /temp above 0 to {what}; nothing "
                  "changed")
        return
    turns = chat.fit(chat.turns[:-1])                                      # the transcript up to your message
    cands = distinct_replies(chat, encode_prompt(chat.enc, turns), k)
    n = len(cands)
    if n < 2:
        term.info(f"the replies were all the same, {REDRAWS + 1} times: nothing to {what}; try a higher "
                  "/temp; nothing changed")
        return
    if n < k:
        term.info(f"only {n} distinct replies in {REDRAWS + 1} tries of {k}: rank these {n}")
    for i, r in enumerate(cands, 1):
        term.say(f"[{i}] " + (" ".join(r.split()) or "(an empty reply)"))  # one line each
    if ranking:
        example = " ".join(str(i) for i in range(n, 0, -1))
        answer = term.ask(f"Their order, best first (e.g. {example}): ", lambda t: parse_order(t, n))
    else:
        answer = term.ask("Which is better? 1, 2 or tie: ", parse_choice)
    scores = rm_scores(chat.rm, chat.enc, turns, cands)     # after the human's answer, so it cannot sway it
    order = None if answer is None else save_order(chat, turns, cands, answer, ranking, scores)
    if scores is not None:
        term.info(rm_verdict(scores, order, tie=answer == "tie"))


def save_order(chat, turns, cands, answer, ranking, scores):
    """Save the human's answer to offer() as a ranking or a comparison; the best reply goes on the
    transcript. Returns the order, reply indices best first."""
    prompt, tie = format_prompt(turns), answer == "tie"
    if ranking:
        order = answer                                                        # reply indices, best first
        record = {"kind": "ranking", "prompt": prompt, "replies": [cands[i] for i in order]}
        said = "best first " + " ".join(str(i + 1) for i in order)
    else:
        order = [0, 1] if tie else [answer, 1 - answer]                      # best first; a tie keeps reply 1
        record = {"kind": "comparison", "prompt": prompt, "chosen": cands[order[0]],
                  "rejected": cands[order[1]], "tie": tie}
        said = ("a tie between 1 and 2 (kept in the file, not trained on)" if tie
                else f"reply {order[0] + 1} is better than reply {order[1] + 1}")
    extra = chat.settings()
    if scores is not None:
        extra.update(rm=chat.rm_path, rm_scores=[round(scores[i], 4) for i in order])  # in the record's order
    chat.save(record, extra, f": {said}; the conversation goes on from reply {order[0] + 1}")
    chat.turns, chat.reply_info = turns + [cands[order[0]]], {**chat.settings(), "interrupted": False}
    return order


def distinct_replies(chat, prompt_ids, k):
    """Up to k distinct replies (a ranking cannot repeat one), k at a time, at most REDRAWS + 1 times."""
    cands = []
    for _ in range(REDRAWS + 1):
        drawn = sample_replies(chat.model, chat.enc, [prompt_ids] * k, chat.s, chat.generator)
        cands = list(dict.fromkeys(cands + drawn))[:k]                       # the first of each, in order
        if len(cands) == k:
            break
    return cands


def rate(chat, rating):
    """/rate N: a rating of the last reply on SCALE."""
    record = {"kind": "rating", "prompt": format_prompt(chat.turns[:-1]), "reply": chat.turns[-1],
              "rating": rating, "scale": list(SCALE)}
    chat.save(record, chat.reply_info, f": {rating} of {SCALE[0]}..{SCALE[1]}")


def fix(chat):
    """/fix: the human writes the reply the Bard should have given; it replaces the last reply."""
    reply = chat.turns[-1]
    corrected = chat.term.ask("Corrected reply: ", lambda t: t.strip())
    if corrected is None:
        return
    if corrected == reply:
        chat.term.info("that is the reply as it was: nothing to save")
        return
    record = {"kind": "correction", "prompt": format_prompt(chat.turns[:-1]), "reply": reply,
              "corrected": corrected}
    chat.save(record, chat.reply_info, "; the conversation goes on from your reply")
    chat.turns = chat.turns[:-1] + [corrected]
    chat.reply_info = {**chat.reply_info, "edited_by_human": True}


# Each feedback command: the arguments it takes (joined by spaces); what is missing before the Bard's first
# reply ("there is ... yet"); its usage; and what it does, given the arguments as numbers
FEEDBACK = {"/compare": ([""], "nothing to compare", "/compare takes no arguments",
                         lambda chat: offer(chat, 2, ranking=False)),
            "/rank": ([str(k) for k in range(2, MAX_RANK + 1)], "nothing to rank",
                      f"/rank needs the number of replies K, from 2 to {MAX_RANK}, e.g. /rank 3",
                      lambda chat, k: offer(chat, k, ranking=True)),
            "/rate": ([str(n) for n in range(SCALE[0], SCALE[1] + 1)], "no reply to rate",
                      f"/rate needs a whole number from {SCALE[0]} to {SCALE[1]}, e.g. /rate 4", rate),
            "/fix": ([""], "no reply to correct",
                     "/fix takes no arguments: type the corrected reply on the next line", fix)}


def load_reward_model(path, device):
    """(RewardModel, path), or (None, None): no --rm and no out/rm.pt, or --rm none."""
    if path == "none" or (path == "" and not os.path.exists("out/rm.pt")):
        return None, None
    path = path or "out/rm.pt"
    try:
        rm = RewardModel.from_checkpoint(load_checkpoint(path, made_by="train_rm.py"))
    except ValueError as e:
        raise ValueError(f"--rm {path}: {e}") from None
    return rm.to(device).eval(), path


def classroom(s, model, rm, ckpt_path):
    """The class of `chat.py --serve` (data/classroom.py): tasks from the held-out plays' prompts, s.replies
    replies each (sampled with the chat's knobs), judged afterwards by the panel and the reward model."""
    from data.classroom import Classroom, class_code
    from data.prepare import load_turns, unique_prompts
    from data.panel import GOLD_EPS, Panel
    enc, panel, lock = get_tokenizer(), Panel(), threading.Lock()
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(s.seed)

    def replies(prompts):                         # every prompt s.replies times, in one batch
        room = model.config.block_size - s.max_new_tokens       # a long typed prompt keeps its end
        ids = [encode_prompt(enc, p)[-room:] for p in prompts for _ in range(s.replies)]
        with lock, torch.no_grad():               # the generator thread and a student's own prompt
            texts = sample_replies(model, enc, ids, s, generator)
        return [texts[i:i + s.replies] for i in range(0, len(texts), s.replies)]

    def judge(chosen, rejected):                  # does the panel's gold order agree with the class?
        diff = panel.gold(chosen) - panel.gold(rejected)
        return None if abs(diff) < GOLD_EPS else diff > 0

    def scores(prompt, texts):
        with lock:
            return rm_scores(rm, enc, prompt, texts)

    code = (s.class_code or class_code()).upper()             # the page upper-cases what students type
    if not re.fullmatch(r"[A-Za-z0-9]{4,40}", code):
        raise ValueError(f"--class_code must be 4 to 40 letters or digits, got {code!r}")
    prompts = unique_prompts(load_turns("test"), None, s.seed)
    return Classroom(replies, prompts, s.class_file, code, k=s.replies, judge=judge,
                     scores=None if rm is None else scores, checkpoint=ckpt_path)


def main(argv=None):
    s = parse_settings(Settings, argv=argv, doc=__doc__)                     # every field is a --flag
    device = ("cuda" if torch.cuda.is_available() else "cpu") if s.device == "auto" else s.device
    ckpt_path = s.ckpt or ("out/ppo.pt" if os.path.exists("out/ppo.pt") else "out/sft.pt")
    try:
        model, _ = load_model(ckpt_path, device=device)
        rm, rm_path = load_reward_model(s.rm, device)
        sampling_args(s, model.config.block_size)
        if s.serve:
            room = classroom(s, model, rm, ckpt_path)           # it checks --class_file is writable
        else:
            check_writable(s.feedback)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if s.serve:
        from data.classroom import serve
        return serve(room, s.host, s.port)
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  line editing and history for input()
    sys.stdout.reconfigure(errors="replace")                            # any text prints, whatever the locale
    sys.stdin.reconfigure(errors="surrogateescape")  # any bytes are read: Terminal.read replaces bad ones
    return Chat(model, get_tokenizer(), s, ckpt_path, rm, rm_path, Terminal(interactive)).run()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)   # imports done: Ctrl-C is main's
    sys.exit(main())
