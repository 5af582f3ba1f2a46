"""
Talk to the Bard, and be the human in RLHF (§5.4.2 human-machine interaction, §3.4.3 real-time feedback).

    python chat.py                                   # out/ppo.pt if it exists, else out/sft.pt
    python chat.py --ckpt out/sft.pt --temperature 0.7
    python chat.py < questions.txt                   # scripted: stdin is not a terminal (see below)
    python train_rm.py --data out/feedback.jsonl --mix_panel   # the reward model learns from what you said
    python chat.py --help                            # every setting below is a --flag

A multi-turn chat in the terminal. Every message is added to a transcript in the chat format the models
were trained on (model.format_prompt, Anthropic HH-RLHF: "\\n\\nHuman: ...\\n\\nAssistant: ..."), and the
reply is streamed token by token. You can also be the human of RLHF: the four kinds of human feedback of
§3.2 are one command each, and every piece of feedback is appended at once (flushed and fsynced) to
out/feedback.jsonl in the schema of data/README.md, which train_rm.py reads with --data. A record's prompt
is the transcript the model saw, and it also keeps the checkpoint, the sampling settings of the judged
replies, the reward model's scores (if any), a timestamp and "source": "chat.py" (read_feedback puts these
under the record's "meta").

Commands:
  /compare     two new replies to your last message; answer 1, 2 or tie       -> a comparison
  /rank K      K new replies (2..9); answer their order best first, e.g. 3 1 2 -> a ranking
  /rate N      rate the last reply from 1 (bad) to 5 (good)                    -> a rating
  /fix         then type a better reply to your last message                   -> a correction
  /temp X  /topk K  /topp P  /max N     sampling settings (§5.4.1); /temp 0 is greedy
  /reset  /help  /exit
After /compare and /rank the reply you prefer (for a tie: reply 1) becomes the reply in the transcript,
and after /fix your text does, so the conversation goes on from the reply you wanted. When a reward model
exists (out/rm.pt, or --rm PATH) its normalised score of each reply is shown AFTER you answer, so you see
where it and you disagree without its opinion swaying yours.

Scripted mode. When stdin is not a terminal, lines are read from it: a message, a command, or the answer
the previous command asks for (the choice after /compare, the order after /rank, the text after /fix; a bad
answer cancels that command). The output has no prompts and no colours: only the replies, each on its own
line(s) starting with "Bard: ", the numbered replies of /compare and /rank ("[1] ...", one line each), and
the commands' messages, starting with "* ".

Ctrl-C while the Bard is talking stops the reply: what he said so far is kept, marked [interrupted]
(feedback on it records "interrupted": true). Ctrl-C or Ctrl-D at the prompt ends the chat.

What it simplifies:
  - the context window: when the transcript no longer fits (block_size - max_new_tokens tokens), the oldest
    exchanges (your message and its reply) are dropped, whole; a message too long to fit even alone keeps its
    BEGINNING (the rest is dropped with a notice): people put what they mean first, and the reply needs
    room too. (data/prepare.py keeps the end of a prompt: a play's speech leads up to the next one.)
  - a reply ends at <|endoftext|> or at a blank line ("\\n\\n", which separates the turns of a transcript);
    no other stop strings, no repetition penalty;
  - /compare and /rank leave out empty and repeated replies (the schema needs distinct texts) and draw
    again, up to REDRAWS times; an empty reply cannot be rated or corrected, for the same reason;
  - feedback is always on the last reply; one person, one model, no undo (edit the JSONL file if you must).
"""
import codecs
import math
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from model import EOT, format_prompt, get_tokenizer, load_checkpoint, parse_settings
from reward import RewardModel, batch_replies, write_feedback
from sample import decode_replies, generate, load_model


@dataclass
class Settings:
    ckpt: str = ""                           # checkpoint to talk to; empty = out/ppo.pt if it exists, else out/sft.pt
    rm: str = ""                             # reward model scoring /compare and /rank; empty = out/rm.pt if it exists; none = off
    feedback: str = "out/feedback.jsonl"     # your feedback is appended here, one JSON line each (train_rm.py --data)
    temperature: float = 0.8                 # divides the logits: < 1 sharper, > 1 flatter, 0 = greedy (/temp)
    top_k: int = 50                          # sample only from the k most likely tokens, 0 = off (/topk)
    top_p: float = 0.95                      # sample only from the smallest set with probability >= p, 1 = off (/topp)
    max_new_tokens: int = 64                 # longest reply in tokens, at most half the context window (/max)
    seed: int = 1337                         # random seed: the same seed and the same input give the same chat
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # where the models run


HELP = """\
commands:
  /compare     two replies to your last message; choose 1, 2 or tie (a comparison)
  /rank K      K replies (2..9); type their order best first, e.g. 3 1 2 (a ranking)
  /rate N      rate the last reply from 1 (bad) to 5 (good) (a rating)
  /fix         then type a corrected reply; it replaces the last reply (a correction)
  /temp X      sampling temperature, X >= 0 (0 = greedy)
  /topk K      sample from the K most likely tokens (0 = off)
  /topp P      nucleus sampling, 0 < P <= 1 (1 = off)
  /max N       longest reply in tokens (1 .. half the context window)
  /reset       forget the conversation
  /help        this list
  /exit        leave (Ctrl-D or Ctrl-C at the prompt too)
anything else is a message to the Bard"""

SETTING_COMMANDS = {"/temp": "temperature", "/topk": "top_k", "/topp": "top_p", "/max": "max_new_tokens"}
SCALE = [1, 5]          # /rate's scale
MAX_RANK = 9            # /rank K takes 2 <= K <= 9: one digit per reply when typing the order
REDRAWS = 3             # /compare and /rank draw again (at most this often) when replies are empty or repeated


def check_setting(name, text, block_size):
    """Parse and validate one sampling setting given as text; ValueError says what is allowed."""
    try:
        value = int(text) if name in ("top_k", "max_new_tokens") else float(text)
    except ValueError:
        value = None
    if name == "temperature" and (value is None or not math.isfinite(value) or value < 0):
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {text!r}")
    if name == "top_k" and (value is None or value < 0):
        raise ValueError(f"top_k must be a whole number >= 0 (0 = off), got {text!r}")
    if name == "top_p" and (value is None or not 0 < value <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] (1 = off), got {text!r}")
    if name == "max_new_tokens" and (value is None or not 1 <= value <= block_size // 2):
        raise ValueError(f"max_new_tokens must be a whole number from 1 to {block_size // 2} (half the "
                         f"context window of {block_size} tokens, so the conversation keeps room), got {text!r}")
    return value


def sampling(s):
    """generate()'s keyword arguments from the settings (0 / 1.0 switch top-k / top-p off)."""
    return dict(temperature=s.temperature, top_k=s.top_k or None, top_p=s.top_p if s.top_p < 1.0 else None)


# ----------------------------------------------------------------------------------------------------
# The context window. The prompt is the whole transcript; it must leave max_new_tokens for the reply:
# room = block_size - max_new_tokens tokens.

def n_tokens(enc, turns):
    return len(enc.encode_ordinary(format_prompt(turns)))


def truncate_message(enc, text, room):
    """Cut a human message so that format_prompt([text]) takes at most `room` tokens, keeping its
    BEGINNING. Returns (text, n) with n the message's length in tokens if it was cut, else 0."""
    text = text.strip()
    if n_tokens(enc, [text]) <= room:
        return text, 0
    toks = enc.encode_ordinary(" " + text)
    for keep in range(min(len(toks), room), 0, -1):                           # the longest beginning that fits
        # decode_bytes + errors="ignore": a cut through a multi-byte character drops its first bytes
        cut = enc.decode_bytes(toks[:keep]).decode("utf-8", errors="ignore").strip()
        if n_tokens(enc, [cut]) <= room:
            return cut, len(toks)
    raise ValueError(f"no room for a message in {room} tokens")


def trim_history(enc, turns, room):
    """Drop the oldest exchanges (a human turn and the reply to it) until the transcript of `turns`
    (alternating human, assistant, ..., ending with a human turn) fits in `room` tokens. The last
    human turn always stays. Returns (kept turns, number of turns dropped)."""
    turns, dropped = list(turns), 0
    while len(turns) > 1 and n_tokens(enc, turns) > room:
        turns, dropped = turns[2:], dropped + 2
    return turns, dropped


# ----------------------------------------------------------------------------------------------------
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
    """The on_token callback of generate() for one reply (B = 1): decodes incrementally and writes the new
    text. A token can hold part of a character (GPT-2 BPE works on bytes); the incremental UTF-8 decoder
    keeps such bytes until the character is complete. Leading spaces are not shown (every reply starts
    with one) and a trailing newline is held back: it may start a blank line, which ends the reply.
    Setting `stop` (Ctrl-C does) ends the reply at the next token."""

    def __init__(self, enc, out):
        self.enc, self.out, self.stop = enc, out, False
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.shown = "", ""                                        # decoded so far; written so far

    def show(self, text):
        visible = text.rstrip("\n").lstrip()                                  # always extends self.shown
        self.out.write(printable(visible[len(self.shown):]))
        self.out.flush()
        self.shown = visible

    def __call__(self, step, tokens):                                         # tokens (1,): this step's token
        if self.stop:
            raise KeyboardInterrupt
        t = int(tokens[0])
        if t == EOT:
            return
        self.text += self.decoder.decode(self.enc.decode_single_token_bytes(t))
        if "\n\n" in self.text:
            self.text = self.text[:self.text.index("\n\n")]
            self.show(self.text)
            raise _EndOfTurn
        self.show(self.text)

    def finish(self):
        self.text += self.decoder.decode(b"", final=True)                     # an unfinished character
        self.show(self.text)


def stream_reply(model, enc, prompt_ids, s, generator, out):
    """Generate one reply to prompt_ids (a list of token ids), writing it to `out` as it is sampled.
    Returns (reply, interrupted): Ctrl-C stops the reply and keeps what was shown so far.

    Ctrl-C (SIGINT) only sets a flag, which the next on_token call turns into a KeyboardInterrupt: a
    KeyboardInterrupt at an arbitrary moment could fall between writing a piece of text and counting
    it as shown, and the reply kept would then differ from the reply the human saw and judges."""
    stream = ReplyStream(enc, out)
    main_thread = threading.current_thread() is threading.main_thread()      # where signal handlers live
    if main_thread:
        old = signal.signal(signal.SIGINT, lambda signum, frame: setattr(stream, "stop", True))
    try:
        generate(model, [prompt_ids], s.max_new_tokens, **sampling(s), generator=generator, on_token=stream)
    except _EndOfTurn:
        pass
    except KeyboardInterrupt:
        return clean_reply(stream.shown), True
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, old if old is not None else signal.default_int_handler)
    stream.finish()
    return clean_reply(stream.text), False


def sample_replies(model, enc, prompt_ids, k, s, generator):
    """k replies to one prompt, in one batch (the same prompt k times), not streamed."""
    seq, pad, resp_mask = generate(model, [prompt_ids] * k, s.max_new_tokens, **sampling(s), generator=generator)
    return [clean_reply(r) for r in decode_replies(enc, seq, resp_mask)]


@torch.no_grad()
def rm_scores(rm, enc, prompt_ids, replies):
    """The reward model's normalised scores (§5.2) of replies to one prompt, a list of floats."""
    reply_ids = [enc.encode_ordinary(" " + r) + [EOT] for r in replies]        # as model.encode_reply
    idx, pad, last = batch_replies(enc, [prompt_ids] * len(replies), reply_ids, rm.body.config.block_size)
    device = rm.head.weight.device
    return rm.score(idx.to(device), last.to(device), pad.to(device)).tolist()  # (K,)


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
        order = None
    if order is None or sorted(order) != list(range(k)):
        raise ValueError(f"type each of the numbers 1..{k} once, best first (e.g. "
                         f"{' '.join(str(i) for i in range(k, 0, -1))}), not {text.strip()!r}")
    return order


# ----------------------------------------------------------------------------------------------------
# The chat session

class Chat:
    def __init__(self, model, enc, s, ckpt_path, rm=None, rm_path=None, interactive=False, out=None):
        self.model, self.enc, self.s, self.ckpt_path = model, enc, s, ckpt_path
        self.rm, self.rm_path, self.interactive = rm, rm_path, interactive
        self.out = out or sys.stdout
        self.color = interactive and self.out.isatty() and "NO_COLOR" not in os.environ
        self.generator = torch.Generator(device=s.device).manual_seed(s.seed)
        self.turns = []            # the transcript: human, assistant, human, assistant, ...
        self.reply_info = {}       # how the last reply was made: sampling settings, interrupted, edited
        self.saved = 0             # feedback records written in this session

    # ---- input / output ---------------------------------------------------------------------------
    def paint(self, text, code):
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def say(self, text, color=None):
        text = printable(text)                                                # then the colour codes
        print(self.paint(text, color) if color else text, file=self.out, flush=True)

    def info(self, text):
        self.say("* " + text, "2")                                            # dim

    def read(self, prompt):
        """One line of input (without its newline). EOFError at the end of input."""
        if self.interactive:
            if self.color:  # \001 \002 tell readline the colour codes take no room on the screen
                prompt = f"\001\033[1;32m\002{prompt}\001\033[0m\002"
            return input(prompt)
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    def ask(self, prompt, parse):
        """The answer to a command: parse(line), or None if cancelled. In a terminal a bad answer is
        asked again (an empty line cancels); in scripted mode it cancels the command."""
        while True:
            try:
                line = self.read(prompt)
            except (EOFError, KeyboardInterrupt):
                if self.interactive:
                    print(file=self.out)
                return None
            if not line.strip():
                return None
            try:
                return parse(line)
            except ValueError as e:
                self.info(str(e))
                if not self.interactive:
                    return None

    # ---- the loop -----------------------------------------------------------------------------------
    def run(self):
        if self.interactive:
            self.info(f"talking to {self.ckpt_path} ({self.model.num_params() / 1e6:.1f}M parameters); "
                      f"feedback goes to {self.s.feedback}")
            self.info(f"reward model: {self.rm_path}" if self.rm is not None else
                      "no reward model (out/rm.pt, made by train_rm.py): /compare and /rank show no scores")
            self.info("/help lists the commands; Ctrl-D or /exit to leave")
        while True:
            try:
                line = self.read("You: ").strip()
            except (EOFError, KeyboardInterrupt):
                if self.interactive:
                    print(file=self.out)
                break
            if not line:
                continue
            try:
                if not self.handle(line):
                    break
            except KeyboardInterrupt:  # Ctrl-C while sampling /compare or /rank replies
                print(file=self.out)
                self.info("cancelled: nothing saved")
        self.info(f"bye: {self.saved} feedback record(s) saved to {self.s.feedback} in this session"
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
        if cmd == "/help":
            self.say(HELP)
        elif cmd == "/reset":
            self.turns, self.reply_info = [], {}
            self.info("the conversation is forgotten; say something new")
        elif cmd in SETTING_COMMANDS:
            self.set(SETTING_COMMANDS[cmd], args)
        elif cmd == "/compare" and not args:
            self.offer(2, ranking=False)
        elif cmd == "/rank" and len(args) == 1 and args[0] in [str(k) for k in range(2, MAX_RANK + 1)]:
            self.offer(int(args[0]), ranking=True)
        elif cmd == "/rate" and len(args) == 1 and args[0] in [str(n) for n in range(SCALE[0], SCALE[1] + 1)]:
            self.rate(int(args[0]))
        elif cmd == "/fix" and not args:
            self.fix()
        elif cmd in ("/compare", "/rank", "/rate", "/fix"):
            usage = {"/compare": "/compare takes no arguments",
                     "/rank": f"/rank needs the number of replies K, from 2 to {MAX_RANK}, e.g. /rank 3",
                     "/rate": f"/rate needs a whole number from {SCALE[0]} to {SCALE[1]}, e.g. /rate 4",
                     "/fix": "/fix takes no arguments: type the corrected reply on the next line"}[cmd]
            self.info(f"{usage} (got {line!r}); nothing changed")
        else:
            self.info(f"unknown command {cmd!r}; nothing changed")
            self.say(HELP)
        return True

    def set(self, name, args):
        s = self.s
        if len(args) != 1:
            self.info(f"{name} is {getattr(s, name)}; to change it give one value, e.g. "
                      f"{[c for c, n in SETTING_COMMANDS.items() if n == name][0]} {getattr(s, name)}")
            return
        try:
            value = check_setting(name, args[0], self.model.config.block_size)
        except ValueError as e:
            self.info(f"{e}; nothing changed")
            return
        setattr(s, name, value)
        self.info(f"{name} = {value}")

    # ---- the transcript -----------------------------------------------------------------------------
    def room(self):
        return self.model.config.block_size - self.s.max_new_tokens           # prompt tokens that fit

    def fit(self, turns):
        """Fit a transcript ending with a human turn in the context window (notices say what went)."""
        turns, dropped = trim_history(self.enc, turns, self.room())
        if dropped:
            self.info(f"the conversation outgrew the context window: forgot its {dropped // 2} oldest exchange(s)")
        last, n = truncate_message(self.enc, turns[-1], self.room())
        if n:
            self.info(f"your message is {n} tokens, more than fit in the context window ({self.room()} tokens "
                      f"= block_size {self.model.config.block_size} - max_new_tokens {self.s.max_new_tokens}, "
                      f"with the chat markers): kept its beginning, {len(self.enc.encode_ordinary(' ' + last))} tokens")
        return turns[:-1] + [last]

    def prompt_ids(self, turns):
        return self.enc.encode_ordinary(format_prompt(turns))

    def chat(self, message):
        turns = self.fit(self.turns + [message])
        self.out.write(self.paint("Bard:", "1;34") + " ")
        self.out.flush()
        reply, interrupted = stream_reply(self.model, self.enc, self.prompt_ids(turns), self.s, self.generator, self.out)
        if interrupted:
            self.out.write(" [interrupted]" if reply else "[interrupted]")
        elif not reply:
            self.out.write("(an empty reply)")
        print(file=self.out, flush=True)
        self.turns = turns + [reply]
        self.reply_info = {**self.settings(), "interrupted": interrupted}

    def settings(self):
        return {k: getattr(self.s, k) for k in ("temperature", "top_k", "top_p", "max_new_tokens")}

    # ---- feedback (§3.2): the four kinds ------------------------------------------------------------
    def save(self, record, extra):
        """Append one record, with where it came from, to the feedback file (write_feedback checks it
        against the schema and fsyncs). The extra keys end up in the record's "meta" for train_rm.py."""
        record = {**record, "checkpoint": self.ckpt_path, **extra,
                  "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "source": "chat.py"}
        try:
            write_feedback(self.s.feedback, record)
        except (ValueError, OSError) as e:
            self.info(f"not saved: {e}")
            return False
        self.saved += 1
        return True

    def last_reply(self, what):
        """The last reply, or None (with an explanation) when there is none to give feedback on."""
        if not self.turns:
            self.info(f"there is no reply to {what} yet: say something first; nothing changed")
            return None
        if not self.turns[-1]:
            self.info(f"the last reply is empty, there is nothing to {what} (the feedback schema needs its text); "
                      "try /compare or a new message; nothing changed")
            return None
        return self.turns[-1]

    def offer(self, k, ranking):
        """/compare (k = 2, ranking False) and /rank k (ranking True): k fresh replies to the last human
        message, sampled in one batch; the human orders them; the best becomes the reply in the transcript."""
        what = "rank" if ranking else "compare"
        if not self.turns:
            self.info(f"there is nothing to {what} yet: say something first; nothing changed")
            return
        if self.s.temperature == 0:
            self.info(f"with /temp 0 (greedy) every reply is the same: set /temp above 0 to {what}; nothing changed")
            return
        turns = self.fit(self.turns[:-1])                                     # the transcript up to your message
        prompt_ids = self.prompt_ids(turns)
        cands = []  # k distinct, non-empty replies (the schema needs text and no repeats): redraw up to 3 times
        for _ in range(REDRAWS + 1):
            for r in sample_replies(self.model, self.enc, prompt_ids, k, self.s, self.generator):
                if r and r not in cands and len(cands) < k:
                    cands.append(r)
            if len(cands) == k:
                break
        n = len(cands)
        if n < 2:
            self.info(f"the replies were empty or all the same, {REDRAWS + 1} times: nothing to {what}; "
                      "try a higher /temp; nothing changed")
            return
        if n < k:
            self.info(f"only {n} distinct, non-empty replies in {REDRAWS + 1} tries of {k}: rank these {n}")
        for i, r in enumerate(cands, 1):
            self.say(f"[{i}] " + " ".join(r.split()))                          # one line each
        if ranking:
            example = " ".join(str(i) for i in range(n, 0, -1))
            answer = self.ask(f"Their order, best first (e.g. {example}): ", lambda t: parse_order(t, n))
        else:
            answer = self.ask("Which is better? 1, 2 or tie: ", parse_choice)
        # the reward model's opinion comes after the human's, so it cannot sway it
        scores = rm_scores(self.rm, self.enc, prompt_ids, cands) if self.rm is not None else None
        if answer is None:
            self.info("cancelled: nothing saved, the transcript is unchanged")
            if scores is not None:
                self.info(rm_verdict(scores))
            return
        prompt, tie = format_prompt(turns), answer == "tie"
        if ranking:
            order = answer                                                    # reply indices, best first
            record = {"kind": "ranking", "prompt": prompt, "replies": [cands[i] for i in order]}
            said = "best first " + " ".join(str(i + 1) for i in order)
        else:
            order = [0, 1] if tie else [answer, 1 - answer]                   # best first; a tie keeps reply 1
            record = {"kind": "comparison", "prompt": prompt, "chosen": cands[order[0]],
                      "rejected": cands[order[1]], "tie": tie}
            said = ("a tie between 1 and 2 (kept in the file, not trained on)" if tie
                    else f"reply {order[0] + 1} is better than reply {order[1] + 1}")
        extra = self.settings()
        if scores is not None:
            extra.update(rm=self.rm_path, rm_scores=[round(scores[i], 4) for i in order])  # in the record's order
        if self.save(record, extra):
            self.info(f"saved a {record['kind']}: {said}; the conversation goes on from reply {order[0] + 1}")
        self.turns, self.reply_info = turns + [cands[order[0]]], {**self.settings(), "interrupted": False}
        if scores is not None:
            self.info(rm_verdict(scores, order, tie))

    def rate(self, rating):
        """/rate N: a rating of the last reply on SCALE."""
        reply = self.last_reply("rate")
        if reply is None:
            return
        record = {"kind": "rating", "prompt": format_prompt(self.turns[:-1]), "reply": reply,
                  "rating": rating, "scale": list(SCALE)}
        if self.save(record, self.reply_info):
            self.info(f"saved a rating: {rating} of {SCALE[0]}..{SCALE[1]}")

    def fix(self):
        """/fix: the human writes the reply the Bard should have given; it replaces the last reply."""
        reply = self.last_reply("correct")
        if reply is None:
            return
        corrected = self.ask("Corrected reply: ", lambda t: t.strip())
        if corrected is None:
            self.info("cancelled: nothing saved, the transcript is unchanged")
            return
        if corrected == reply:
            self.info("that is the reply as it was: nothing to save")
            return
        record = {"kind": "correction", "prompt": format_prompt(self.turns[:-1]), "reply": reply,
                  "corrected": corrected}
        if self.save(record, self.reply_info):
            self.info("saved a correction; the conversation goes on from your reply")
        self.turns = self.turns[:-1] + [corrected]
        self.reply_info = {**self.reply_info, "edited_by_human": True}


def rm_verdict(scores, order=None, tie=False):
    """One line: the reward model's scores, and whether it orders the replies as the human did (order:
    the human's, reply indices best first; None if the human gave none)."""
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


# ----------------------------------------------------------------------------------------------------

def load_reward_model(path, device):
    """(RewardModel, path), or (None, None): no --rm and no out/rm.pt, or --rm none."""
    if path == "none" or (path == "" and not os.path.exists("out/rm.pt")):
        return None, None
    path = path or "out/rm.pt"
    rm = RewardModel.from_checkpoint(load_checkpoint(path, made_by="train_rm.py"))
    return rm.to(device).eval(), path


def main(argv=None):
    s = parse_settings(Settings, argv=argv, doc=__doc__)                     # every field is a --flag
    ckpt_path = s.ckpt or ("out/ppo.pt" if os.path.exists("out/ppo.pt") else "out/sft.pt")
    try:
        model, _ = load_model(ckpt_path, device=s.device)
        rm, rm_path = load_reward_model(s.rm, s.device)
        for name in ("temperature", "top_k", "top_p", "max_new_tokens"):
            setattr(s, name, check_setting(name, str(getattr(s, name)), model.config.block_size))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  line editing and history for input()
        except ImportError:
            pass
    sys.stdout.reconfigure(errors="replace")                                  # any text prints, whatever the locale
    return Chat(model, get_tokenizer(), s, ckpt_path, rm, rm_path, interactive).run()


if __name__ == "__main__":
    sys.exit(main())
