"""
Turn Shakespeare's plays into (prompt, reply) dialogue turns, the SFT data of the book's chat model.

    python data/prepare.py            # build data/cache/ once (a few seconds), print the counts
    python data/prepare.py --force    # rebuild even if the cache exists
    python data/prepare.py --plays    # also list the number of turns of every play

    from data.prepare import prepare, load_turns, CACHE_DIR
    meta = prepare()                  # builds data/cache/ if it is missing, returns meta.json as a dict
    turns = load_turns("test")        # [{"work": "hamlet", "scene": 0, "prompt": "...", "reply": "..."}, ...]

What it does, top to bottom:
  1. read the 42 works (`*_gut.txt`) straight out of data/shakespeare.tar.xz (in memory, nothing downloaded);
  2. parse_play(): drop the front matter and every [stage direction], split at ACT / SCENE lines, collect
     each speaker's speech; turns_from_scenes(): two consecutive speeches by different speakers in one
     scene make one turn (prompt = the first, reply = the second);
  3. cut long speeches at sentence boundaries to at most 64 GPT-2 tokens: a prompt keeps its END (the
     words the reply answers), a reply keeps its BEGINNING;
  4. split by whole play and write, per split, data/cache/:
       {split}.bin         uint16 token stream: format_prompt(prompt), then encode_reply(reply) (+ EOT)
       {split}_mask.bin    uint8, 1 on reply tokens incl. the EOT (what SFT trains on), 0 on prompt tokens
       {split}_turns.jsonl one JSON object per turn: {"work", "scene", "prompt", "reply"}
     and meta.json (counts) last; each file via a temp file and a rename, so none is ever half written.

What it simplifies: a speaker is recognised by the layout of the line alone (no cast list), so a rare
short speech line can be taken for a speaker or a speaker missed; speeches with no speaker (e.g. Gower's
choruses in Pericles) are dropped, and unbracketed stage directions (a few in the Henry VI plays) are
kept as speech. A turn is one exchange: no longer dialogue history is kept.
"""
import argparse
import collections
import contextlib
import functools
import itertools
import json
import lzma
import os
import random
import re
import tarfile
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TARBALL = os.path.join(HERE, "shakespeare.tar.xz")  # the vendored texts (see data/README.md)
CACHE_DIR = os.path.join(HERE, "cache")             # generated files (git-ignored)
MAX_TOKENS = 64                                     # longest prompt or reply text, in GPT-2 tokens
VERSION = 2                                         # bump when the output changes, to rebuild old caches

# Split by whole play. The test plays are well known (demo prompts); RM and PPO evaluate on their prompts.
VAL_PLAYS = ("macbeth", "much_ado_about_nothing")
TEST_PLAYS = ("hamlet", "twelfth_night", "tempest")
SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------------------------------
# Tokenizer: GPT-2's byte-level BPE from the vendored file, cut to its first VOCAB_SIZE - 1 ranks, with
# <|endoftext|> last. A BPE cut after its first N merges still round-trips any string (the 256 byte tokens
# come first; every merged token is made of lower ranks). Why cut: the turns use only ~16k of GPT-2's
# 50,257 tokens, and with all of them a d=128 model spends ~86% of its FLOPs in the output layer.
VOCAB_SIZE = 8192
EOT = VOCAB_SIZE - 1  # <|endoftext|>: ends every reply (and pads batches)
TOKENIZER_NAME = f"gpt2-bpe-{VOCAB_SIZE}"   # recorded in every checkpoint: what its token ids mean
TOKENIZER_FILE = os.path.join(HERE, "gpt2.tiktoken")
TOKENIZER_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@functools.lru_cache(maxsize=None)
def get_tokenizer(vocab_size=VOCAB_SIZE, path=TOKENIZER_FILE, expected_hash=TOKENIZER_SHA256):
    """tiktoken Encoding of GPT-2's BPE cut to `vocab_size` ids: ranks 0 .. vocab_size - 2, then
    <|endoftext|> = vocab_size - 1. vocab_size=50257 gives GPT-2's own tokenizer."""
    import hashlib
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer file {path} is missing (it ships in data/; restore it with git)")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != expected_hash:
        raise ValueError(f"tokenizer file {path} has sha256 {digest}, expected {expected_hash}: "
                         "the file is corrupt or not GPT-2's BPE")
    ranks = load_tiktoken_bpe(path, expected_hash=expected_hash)              # bytes -> rank, 50,256 of them
    if not 257 <= vocab_size <= len(ranks) + 1:
        raise ValueError(f"vocab_size must be in [257, {len(ranks) + 1}], got {vocab_size}")
    kept = {token: rank for token, rank in ranks.items() if rank < vocab_size - 1}
    return tiktoken.Encoding(name=f"gpt2-bpe-{vocab_size}", pat_str=GPT2_PATTERN, mergeable_ranks=kept,
                             special_tokens={"<|endoftext|>": vocab_size - 1}, explicit_n_vocab=vocab_size)


# Chat format: Anthropic HH-RLHF transcripts, "\n\nHuman: ...\n\nAssistant: ...". A reply is encoded as
# " " + text + <|endoftext|>, so a prompt always ends with "Assistant:" and a reply starts with a space.
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def format_prompt(turns):
    """turns (a str, or alternating human, assistant, ... ending with a human turn) -> the transcript,
    ending in "\\n\\nAssistant:" for the model to reply."""
    turns = [turns] if isinstance(turns, str) else turns
    said = ((HUMAN if i % 2 == 0 else ASSISTANT) + " " + t.strip() for i, t in enumerate(turns))
    return "".join(said) + ASSISTANT


def encode_reply(enc, reply):
    return enc.encode_ordinary(" " + reply.strip()) + [EOT]


def read_works(path=None):
    """{work name: text} for every `*_gut.txt` in the archive ("hamlet" for shakespeare/hamlet_gut.txt)."""
    path = path or TARBALL
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: it ships with the repo (restore it with "
                                f"`git checkout -- data/shakespeare.tar.xz`); see data/README.md")
    try:
        with tarfile.open(path, "r:xz") as tar:
            texts = [m for m in tar.getmembers() if m.isfile() and m.name.endswith("_gut.txt")]
            works = {os.path.basename(m.name).removesuffix("_gut.txt"):
                     tar.extractfile(m).read().decode("utf-8", errors="replace") for m in texts}
    except (tarfile.TarError, lzma.LZMAError, EOFError, OSError) as e:
        raise ValueError(f"{path} is not a readable .tar.xz archive ({type(e).__name__}: {e})") from None
    if not works:
        raise ValueError(f"{path} holds no shakespeare/*_gut.txt files")
    return dict(sorted(works.items()))


# ----------------------------------------------------------------------------------------------------
# Parsing one play. Layout of the texts (blank lines between):
#   ACT I.                                   <- heading: ACT / SCENE / PROLOGUE / EPILOGUE / INDUCTION
#   Scene I. Elsinore. A platform ...        <- heading
#   [Francisco at his post. Enter ...]       <- stage direction, dropped (may span lines, or sit inline)
#   Ber.                                     <- speaker line: after a blank line, before a speech line
#   Who's there?                             <- speech
#   KING. Ay, that is ...                    <- some plays: CAPS speaker and speech on one line

ACT_RE = re.compile(r"^(ACT|Act)\s+([IVX]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b")  # ACT I. / ACT FIRST
SCENE_RE = re.compile(r"^(SCENE|Scene)\s+([IVXLC]+|\d+)\b")       # SCENE II. / Scene I.--Athens
SECTION_RE = re.compile(r"^(PROLOGUE|EPILOGUE|INDUCTION)\.?$")    # a heading only if a blank line follows
# Speaker names: 1-4 words, maybe numbered ("1 Clown."), maybe several ("CAESAR, ANTONY, and LEPIDUS.").
NUM, SEP = r"(\d\.? )?", r",? "                                   # "1 " or "1. "; words apart by " " or ", "
TITLE_WORD = r"([A-Z][\w'-]*\.?|of|and|the|de|du|la|&)"           # Lady / M. / of
CAPS_WORD = r"([A-Z][A-Z'-]*\.?|of|and|&)"                        # FIRST / LORD. / and
TITLE_SPEAKER_RE = re.compile(rf"^{NUM}[A-Z][\w'-]*\.?({SEP}{TITLE_WORD}){{0,3}}\.$")  # Ber. / Lady M.
CAPS_SPEAKER_RE = re.compile(rf"^{NUM}[A-Z][A-Z'-]+\.?({SEP}{CAPS_WORD}){{0,3}}$")     # THESEUS / FIRST LORD.
# "KING. Ay, that is ...": CAPS name, '.', then speech that starts with no lowercase letter but has one
CAPS_INLINE_RE = re.compile(rf"^(?P<name>{NUM}[A-Z][A-Z'-]+({SEP}([A-Z][A-Z'-]+|and|&)){{0,3}})\. +"
                            r"(?P<speech>[^a-z].*[a-z].*)$")
NUMERAL_RE = re.compile(r"^([IVX]{2,}|V|X)\.?$")                  # stanza number of a song: dropped
BRACKET_RE = re.compile(r"\[[^\[\]]*\]")                         # one [stage direction] within a line


def classify_lines(text):
    """Lines of (kind, text), kind "blank", "direction", "heading" or "text", stage directions removed. A
    "[" not closed on its line runs until "]" or a blank line."""
    lines, in_direction = [], False
    raw = [line.strip() for line in text.splitlines()]
    for i, line in enumerate(raw):
        if not line:
            lines.append(("blank", ""))
            in_direction = False                                   # an unclosed "[" ends at a blank line
            continue
        had_direction = in_direction or "[" in line or "]" in line
        if in_direction:                                           # inside a multi-line [direction]:
            in_direction = "]" not in line
            line = line.partition("]")[2]                              # keep what follows "]", if any
        line = BRACKET_RE.sub(" ", line)                           # inline [directions]
        if "[" in line:                                            # a direction that goes on below
            line, in_direction = line.split("[", 1)[0], True
        line = " ".join(line.replace("]", " ").split())            # stray "]" and extra spaces
        next_blank = i + 1 >= len(raw) or not raw[i + 1]
        if not line or NUMERAL_RE.match(line):
            lines.append(("direction" if had_direction or line else "blank", ""))
        elif (ACT_RE.match(line) or SCENE_RE.match(line) or (SECTION_RE.match(line) and next_blank)
              or (lines and lines[-1][0] == "heading")):           # or a scene heading's second line
            lines.append(("heading", line))
        else:
            lines.append(("text", line))
    return lines


def speaker_name(line):
    """The speaker's name if the line looks like one (1-4 words: Title-case ending in '.', or ALL CAPS)."""
    return line.rstrip(".") if TITLE_SPEAKER_RE.match(line) or CAPS_SPEAKER_RE.match(line) else None


def parse_play(text):
    """List of scenes, each a list of (speaker, speech); the front matter (cast list) is dropped, every
    heading starts a scene, one speaker's consecutive speeches are merged. A speaker line follows a non-text
    line and looks like a name with speech next (or, ALL CAPS with '.', after blank lines: a few plays), or
    is "KING. Ay, that is ...", name and speech on one line."""
    lines = classify_lines(text)
    scenes, speeches = [], None                    # this scene's [(speaker, [line, ...])]; None: front matter

    def next_line(i, skip):                                        # first line after i of a kind not in skip
        return next((k_l for k_l in lines[i + 1:] if k_l[0] not in skip), ("blank", ""))

    def is_speaker(i, line):
        if speaker_name(line) is None:
            return False
        if next_line(i, skip=("direction",))[0] == "text":         # "Ber." / "Who's there?"
            return True
        kind, after = next_line(i, skip=("direction", "blank"))   # "NESTOR." / "" / "[Aside]" / "And yet..."
        return (CAPS_SPEAKER_RE.match(line) is not None and line.endswith(".") and kind == "text"
                and speaker_name(after) is None and CAPS_INLINE_RE.match(after) is None)

    for i, (kind, line) in enumerate(lines + [("heading", "")]):   # a last heading ends the last scene
        if kind == "heading":                                      # ACT / SCENE: the dialogue restarts
            spoken = [(who, said) for who, said in speeches or [] if said]     # speeches with words
            runs = itertools.groupby(spoken, key=lambda speech: speech[0])   # a speaker's consecutive ones
            scene = [(who, " ".join(part for _, said in run for part in said)) for who, run in runs]
            if scene:
                scenes.append(scene)
            speeches = []
            continue
        if speeches is None or kind != "text":                     # front matter; blank or direction
            continue
        at_start = i == 0 or lines[i - 1][0] != "text"             # after a blank/direction/heading line
        inline = CAPS_INLINE_RE.match(line)
        if inline:                                                 # "KING. Ay, that is ..."
            speeches.append((inline["name"], [inline["speech"]]))
        elif at_start and is_speaker(i, line):                     # "Ber." then the speech below
            speeches.append((speaker_name(line), []))
        elif speeches:                                             # a speech line (lines with no
            speeches[-1][1].append(line)                           # speaker yet are dropped)
    return scenes


def turns_from_scenes(scenes):
    """(prompt, reply, scene index) for every two consecutive speeches by different speakers."""
    return [(said_a, said_b, s) for s, scene in enumerate(scenes)
            for (who_a, said_a), (who_b, said_b) in zip(scene, scene[1:]) if who_a != who_b]


# ----------------------------------------------------------------------------------------------------
# Cutting long speeches to at most max_tokens tokens. A sentence ends after . ! ? ; or : and a space, maybe
# with a closing quote ("night.' Go") or a dash ("a fool!--I met") in between.
SENTENCE_END_RE = re.compile(r"(?<=[.!?;:])\s+|(?<=[.!?;:]['\")])\s+|(?<=[.!?;:]--)\s*")


def n_tokens(enc, text):
    """Tokens of text as it sits in the stream, after a space: "Human: <prompt>", "Assistant: <reply>"."""
    return len(enc.encode_ordinary(" " + text))


def _cut(text, enc, max_tokens, keep_end):
    """Keep the longest run of whole sentences from the start (or the end) of text that fits."""
    text = " ".join(text.split())
    if n_tokens(enc, text) <= max_tokens:
        return text
    bounds = list(SENTENCE_END_RE.finditer(text))   # each match sits between two sentences
    pieces = ((text[m.end():] for m in bounds) if keep_end        # suffixes or prefixes of whole sentences,
              else (text[:m.start()] for m in reversed(bounds)))  # longest first: the first that fits
    best = next((piece for piece in pieces if piece and n_tokens(enc, piece) <= max_tokens), None)
    if best:
        return best
    # Not even one sentence fits: cut by tokens, then drop the word the cut went through (if it did not
    # fall on a space), and more words in the rare case that re-encoding the cut text grew it.
    tokens = enc.encode_ordinary(" " + text)
    kept = enc.decode(tokens[-max_tokens:] if keep_end else tokens[:max_tokens])
    after_cut = kept if keep_end else enc.decode(tokens[max_tokens:])  # what follows the cut
    partial = not after_cut.startswith(" ")                    # "...lov|'d him half" / "...the cuck|old"
    words = kept.split()
    while len(words) > 1 and (partial or n_tokens(enc, " ".join(words)) > max_tokens):
        words = words[1:] if keep_end else words[:-1]
        partial = False
    return " ".join(words)


def cut_reply(text, enc, max_tokens=MAX_TOKENS):
    """A reply keeps its BEGINNING: the first whole sentences that fit in max_tokens."""
    return _cut(text, enc, max_tokens, keep_end=False)


def cut_prompt(text, enc, max_tokens=MAX_TOKENS):
    """A prompt keeps its END: the last whole sentences (what the reply answers) that fit."""
    return _cut(text, enc, max_tokens, keep_end=True)


def encode_turn(enc, prompt, reply, transcript=False):
    """Token ids and loss mask of one turn: prompt in chat format (mask 0), reply + EOT (mask 1).
    transcript=True: the prompt is already a whole transcript ending in "\n\nAssistant:"."""
    p = enc.encode_ordinary(prompt if transcript else format_prompt(prompt))
    r = encode_reply(enc, reply)
    return p + r, [0] * len(p) + [1] * len(r)


def split_of(work):
    return "test" if work in TEST_PLAYS else "val" if work in VAL_PLAYS else "train"


def _write_atomic(name, data):
    """Write bytes to CACHE_DIR/name via a temp file there and a rename: never a half-written file."""
    path = os.path.join(CACHE_DIR, name)
    fd, tmp = tempfile.mkstemp(dir=CACHE_DIR, prefix=name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)                                       # mkstemp makes it owner-only
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def prepare(force=False, verbose=True):
    """Build data/cache/ from data/shakespeare.tar.xz unless it is already there; return meta.json."""
    meta_path = os.path.join(CACHE_DIR, "meta.json")
    outputs = [f"{s}{ext}" for s in SPLITS for ext in (".bin", "_mask.bin", "_turns.jsonl")]
    if not force and all(os.path.exists(os.path.join(CACHE_DIR, p)) for p in outputs + ["meta.json"]):
        with contextlib.suppress(OSError, ValueError):             # unreadable meta.json: rebuild
            with open(meta_path) as f:
                meta = json.load(f)
            if meta.get("version") == VERSION and meta.get("tokenizer") == TOKENIZER_NAME:
                return meta
    t0 = time.time()
    if verbose:
        print(f"building {CACHE_DIR} from {TARBALL} ...")
    works = read_works(TARBALL)
    missing = [w for w in VAL_PLAYS + TEST_PLAYS if w not in works]
    if missing:
        raise ValueError(f"{TARBALL} has no play(s) {missing} named in VAL_PLAYS / TEST_PLAYS")
    enc = get_tokenizer()
    all_turns = []                                                 # in play order
    for work, text in works.items():
        for prompt, reply, scene in turns_from_scenes(parse_play(text)):
            prompt, reply = cut_prompt(prompt, enc), cut_reply(reply, enc)
            if prompt and reply:                                   # skip turns emptied by cleaning
                all_turns.append({"work": work, "scene": scene, "prompt": prompt, "reply": reply})
    turns = {s: [t for t in all_turns if split_of(t["work"]) == s] for s in SPLITS}
    turns_per_play = dict(collections.Counter(t["work"] for t in all_turns))   # in play order too

    # meta.json last (removed first, so a rebuild cut short leaves none)
    os.makedirs(CACHE_DIR, exist_ok=True)
    if os.path.exists(meta_path):
        os.remove(meta_path)
    meta = {"version": VERSION, "tokenizer": TOKENIZER_NAME, "source": os.path.basename(TARBALL),
            "max_tokens": MAX_TOKENS, "works_read": len(works), "plays_with_dialogue": len(turns_per_play),
            "val_plays": list(VAL_PLAYS), "test_plays": list(TEST_PLAYS),
            "turns": {}, "tokens": {}, "reply_tokens": {}, "turns_per_play": turns_per_play}
    for split in SPLITS:
        encoded = [encode_turn(enc, t["prompt"], t["reply"]) for t in turns[split]]
        ids = [i for turn_ids, _ in encoded for i in turn_ids]
        mask = [m for _, turn_mask in encoded for m in turn_mask]
        _write_atomic(f"{split}.bin", np.array(ids, dtype=np.uint16).tobytes())
        _write_atomic(f"{split}_mask.bin", np.array(mask, dtype=np.uint8).tobytes())
        _write_atomic(f"{split}_turns.jsonl", "".join(json.dumps(t) + "\n" for t in turns[split]).encode())
        meta["turns"][split] = len(turns[split])
        meta["tokens"][split] = len(ids)
        meta["reply_tokens"][split] = int(sum(mask))
    meta["seconds"] = round(time.time() - t0, 1)
    _write_atomic("meta.json", (json.dumps(meta, indent=1) + "\n").encode("utf-8"))
    if verbose:
        print_counts(meta)
    return meta


def load_turns(split):
    """The turns of one split: a list of {"work", "scene", "prompt", "reply"}. Builds the cache if needed."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    prepare(verbose=False)
    with open(os.path.join(CACHE_DIR, f"{split}_turns.jsonl")) as f:
        return [json.loads(line) for line in f]


def unique_prompts(turns, n, seed):
    """Up to n distinct prompts (human turns) of some turns, in a seeded random order (n None: all)."""
    prompts = sorted({t["prompt"] for t in turns})
    random.Random(seed).shuffle(prompts)
    return prompts if n is None else prompts[:n]


# The plays' own word list, for a real-word rate: the share of a reply's words that Shakespeare used, a cheap
# check that a small model writes words and not BPE fragments glued together ("moonsassert").
WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)*")   # a word: letters, maybe with an apostrophe inside ("thou'rt")


def words(text):
    return WORD_RE.findall(text.lower())


@functools.lru_cache(maxsize=1)
def play_words():
    """Every word of a prompt or reply of any split, lowercased: a frozenset (read once per process)."""
    return frozenset(w for split in SPLITS for t in load_turns(split)
                     for w in words(t["prompt"] + " " + t["reply"]))


def real_word_rate(texts, vocab=None):
    """Mean over replies with a word of the share of their words in `vocab` (default play_words()), or nan."""
    vocab = play_words() if vocab is None else vocab
    rates = [sum(w in vocab for w in ws) / len(ws) for ws in map(words, texts) if ws]
    return sum(rates) / len(rates) if rates else float("nan")


def print_counts(meta):
    print(f"{meta['works_read']} works read, {meta['plays_with_dialogue']} plays with dialogue "
          f"(built in {meta.get('seconds', '?')} s)")
    print(f"{'split':<6} {'plays':>5} {'turns':>7} {'tokens':>9} {'reply tokens':>13}")
    for s in SPLITS:
        plays = sum(split_of(w) == s for w in meta["turns_per_play"])
        print(f"{s:<6} {plays:>5} {meta['turns'][s]:>7} {meta['tokens'][s]:>9} {meta['reply_tokens'][s]:>13}")
    print(f"val: {', '.join(meta['val_plays'])}   test: {', '.join(meta['test_plays'])}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Build data/cache/ (SFT turns) from data/shakespeare.tar.xz.")
    ap.add_argument("--force", action="store_true", help="rebuild even if data/cache/meta.json exists")
    ap.add_argument("--plays", action="store_true", help="also print the number of turns of every play")
    args = ap.parse_args()
    meta = prepare(force=args.force, verbose=False)
    print_counts(meta)
    if args.plays:
        for work, n in meta["turns_per_play"].items():
            print(f"  {work:<36} {n:>5} turns ({split_of(work)})")
