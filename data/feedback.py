"""
Human-feedback files ([流程与实践 §3.2] 人类反馈收集: rating, ranking, comparison, correction): one JSONL schema
for the four kinds, and Anthropic HH-RLHF files ([实战框架 §7.2.3]) read as they are.

    python data/feedback.py out/feedback.jsonl      # check files: counts per kind, the first errors

    from data.feedback import read_feedback, write_feedback, sft_examples
    records, n_skipped = read_feedback(["out/feedback.jsonl"])   # normalised records, see below
    write_feedback("out/feedback.jsonl", {"kind": "rating", "prompt": "Hi", "reply": "Hello.", "rating": 4})

The schema, with an example of each kind, is in data/README.md. Every line becomes a record
    {"kind", "prompt": transcript ending in "\\n\\nAssistant:", "replies": best first (a rating: [reply]),
     "prompts": the transcript each reply answers, "tie": bool, "meta": {the line's other keys},
     "source": "file:line"}     (+ "rating", "scale")
"prompts" is "prompt" repeated, except for an HH-RLHF pair whose transcripts part before the last reply.
A correction becomes replies [corrected, original]: a comparison, and sft_examples() gives its SFT pair.
An empty reply is a reply (the model said nothing: just its <|endoftext|>); an empty prompt is an error.

Nothing is lost: write_feedback() appends one fsynced line under an exclusive lock (several writers, one
file), readers take a shared one; a crash's partial last line is moved aside to FILE.partial first.
"""
import argparse
import contextlib
import gzip
import json
import math
import os
import sys
import warnings
import zlib

try:
    import fcntl                        # file locks (POSIX); none on Windows
except ImportError:
    fcntl = None

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:  # `python data/feedback.py` finds the data package
    sys.path.insert(0, os.path.dirname(HERE))
from data.prepare import ASSISTANT, HUMAN, format_prompt  # noqa: E402

GZIP_MAGIC = b"\x1f\x8b"   # the first two bytes of a gzip file
# each kind's fields (a line's other keys go under "meta"), and those holding its replies, best first (a
# ranking's: its list 'replies'): a correction's edited reply is preferred to the original
FIELDS = {"comparison": ("prompt", "chosen", "rejected", "tie"), "ranking": ("prompt", "replies"),
          "rating": ("prompt", "reply", "rating", "scale"), "correction": ("prompt", "reply", "corrected")}
REPLIES = {"comparison": ("chosen", "rejected"), "rating": ("reply",), "correction": ("corrected", "reply")}
KINDS = tuple(FIELDS)


def _string(v, what):
    if not isinstance(v, str):
        raise ValueError(f"{what} must be a string, got {type(v).__name__}")
    return v.strip()


def _number(v, what):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number, got {v!r}")
    return float(v)


def _field(obj, key, check=_string):
    if key not in obj:
        raise ValueError(f"missing field {key!r}")
    return check(obj[key], f"field {key!r}")


def _prompt(obj):
    """A plain human message is wrapped with format_prompt; a transcript is used as it is."""
    p, raw = _field(obj, "prompt"), obj["prompt"]
    if not p:
        raise ValueError("field 'prompt' is empty")
    if raw.startswith(HUMAN):
        if not raw.endswith(ASSISTANT):
            raise ValueError("a prompt transcript (starting with '\\n\\nHuman:') must end with "
                             "'\\n\\nAssistant:'")
        return raw
    return format_prompt(p)


def _split_hh(obj, key):
    """HH-RLHF: a whole transcript -> (the transcript up to its LAST "\\n\\nAssistant:", the reply after)."""
    text = obj.get(key)
    if not isinstance(text, str) or not text.startswith(HUMAN) or ASSISTANT not in text:
        raise ValueError(f"{key!r} is not a transcript '\\n\\nHuman: ...\\n\\nAssistant: ...'")
    cut = text.rfind(ASSISTANT) + len(ASSISTANT)
    return text[:cut], text[cut:].strip()


def _rating(obj):
    scale = obj.get("scale", [1, 5])
    if not isinstance(scale, list) or len(scale) != 2:
        raise ValueError(f"field 'scale' must be [lowest, highest], got {scale!r}")
    lo, hi = (_number(x, "a scale bound") for x in scale)
    r = _field(obj, "rating", _number)
    if not lo < hi or not lo <= r <= hi:
        raise ValueError(f"rating {obj['rating']!r} is not within scale [{lo:g}, {hi:g}]")
    return r, [lo, hi]


def parse_feedback(obj):
    """One decoded JSON line -> normalised record (without "source"). ValueError says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    kind = obj.get("kind")
    if kind is None and "chosen" in obj and "rejected" in obj:               # Anthropic HH-RLHF, as it is
        (p, a), (p_r, b) = _split_hh(obj, "chosen"), _split_hh(obj, "rejected")
        rec = {"kind": "comparison", "prompt": p, "replies": [a, b], "prompts": [p, p_r]}
        used = ("chosen", "rejected")
    elif kind is None:
        raise ValueError(f"no 'kind' field: expected one of {list(KINDS)}, or an HH-RLHF chosen/rejected "
                         "pair")
    elif kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: expected one of {list(KINDS)}")
    else:
        rec, used = {"kind": kind, "prompt": _prompt(obj)}, ("kind",) + FIELDS[kind]
        if kind == "ranking":
            rs = obj.get("replies")
            if not isinstance(rs, list) or len(rs) < 2:
                raise ValueError("field 'replies' must be a list of at least 2 replies, best first")
            rec["replies"] = [_string(r, f"replies[{i}]") for i, r in enumerate(rs)]
            if len(set(rec["replies"])) < len(rs):
                raise ValueError("field 'replies' repeats a reply")
        else:
            rec["replies"] = [_field(obj, key) for key in REPLIES[kind]]
        if kind == "comparison" and not isinstance(obj.get("tie", False), bool):
            raise ValueError(f"field 'tie' must be true or false, got {obj['tie']!r}")
        if kind == "rating":
            rec["rating"], rec["scale"] = _rating(obj)
        rec["prompts"] = [rec["prompt"]] * len(rec["replies"])
    # two identical replies after identical transcripts (HH-RLHF has some) carry no preference: a tie
    same = len(set(zip(rec["prompts"], rec["replies"]))) < len(rec["replies"])
    rec["tie"] = same or (kind == "comparison" and obj.get("tie", False))
    rec["meta"] = {k: v for k, v in obj.items() if k not in used}
    return rec


def _parse_line(raw, lineno):
    """The bytes of one line -> normalised record, or None for a blank line."""
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")           # a BOM may start the file
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        if e.msg.startswith("Unterminated string") or e.pos >= len(line.rstrip()):
            raise ValueError(f"not valid JSON: the line is cut short after {len(line.rstrip())} characters "
                             "(was a program stopped while writing it?)") from None
        raise ValueError(f"not valid JSON ({e.msg}, column {e.colno})") from None
    return parse_feedback(obj)


def check_paths(paths):
    """The list of feedback files to read: each one a readable file, none named twice."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else [p for p in paths if p]
    if not paths:
        raise ValueError("no feedback files given")
    seen = {}
    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(f"feedback file {p} not found")
        if os.path.isdir(p):
            raise ValueError(f"feedback file {p} is a directory, not a JSONL file")
        real = os.path.realpath(p)
        if real in seen:
            raise ValueError(f"feedback file {p} is given twice ({seen[real]} and {p}): its records would "
                             "count twice")
        seen[real] = p
    return paths


@contextlib.contextmanager
def open_feedback(path):
    """A feedback file's bytes, plain or gzip (HH-RLHF ships as .jsonl.gz), under a shared lock."""
    with locked(open(path, "rb"), exclusive=False) as f:
        gzipped = f.read(2) == GZIP_MAGIC
        f.seek(0)
        with gzip.GzipFile(fileobj=f, mode="rb") if gzipped else contextlib.nullcontext(f) as g:
            yield g


def read_feedback(paths, skip_bad=False, errors=None):
    """Feedback JSONL file(s) -> (records in file order, n_skipped). A bad line raises ValueError("file:line:
    what is wrong"); skip_bad=True skips it, warns with the first message, appends all to `errors`."""
    paths = check_paths(paths)
    records, bad = [], []
    for path in paths:
        lineno = 0
        try:
            with open_feedback(path) as f:
                for lineno, raw in enumerate(f, 1):
                    try:
                        rec = _parse_line(raw, lineno)
                    except ValueError as e:
                        if not skip_bad:
                            raise ValueError(f"{path}:{lineno}: {e}") from None
                        bad.append(f"{path}:{lineno}: {e}")
                        continue
                    if rec is not None:
                        records.append({**rec, "source": f"{path}:{lineno}"})
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:                # a .gz file cut short or damaged
            raise ValueError(f"{path}:{lineno + 1}: the gzip file is damaged or cut short ({e})") from None
    if bad:
        warnings.warn(f"skipped {len(bad)} bad feedback line(s); the first: {bad[0]}")
        if errors is not None:
            errors.extend(bad)
    if not records:
        raise ValueError(f"{', '.join(map(str, paths))}: no feedback records"
                         + (f" ({len(bad)} bad line(s) skipped)" if bad else " (the file(s) are empty)"))
    return records, len(bad)


def check_writable(path):
    """Raise OSError (naming `path`) unless feedback can be appended to it, without changing the file."""
    if os.path.isdir(path):
        raise OSError(f"feedback file {path} is a directory")
    if os.path.exists(path):
        try:
            if not os.path.isfile(path) or not os.access(path, os.W_OK):
                raise PermissionError(13, "not a writable file")
            with open(path, "a+b") as f:                                     # e.g. a read-only mount, /proc
                f.seek(0)
                if f.read(2) == GZIP_MAGIC:
                    raise PermissionError(13, "gzip-compressed: feedback is appended to a plain JSONL file")
        except OSError as e:
            raise OSError(f"feedback file {path} is not writable ({e.strerror or e})") from None
        return
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".{os.path.basename(path)}.probe")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise OSError(f"cannot write the feedback file {path}: {e.strerror or e}") from None


def locked(f, exclusive):
    """Lock the open file f until it is closed: exclusive for a writer, shared for readers. Every writer
    takes it, so a line without its newline seen under it is a crash's leftover (no fcntl: no lock)."""
    if fcntl is not None:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    return f


def heal(f, path):
    """Under the writer's lock, before an append to f (open "a+b"): a last line without its newline is a
    complete record (the newline is added) or a fragment, moved to PATH.partial. Returns a message or None."""
    f.seek(0)
    data = f.read()
    if not data or data.endswith(b"\n"):
        return None
    start = data.rfind(b"\n") + 1
    tail = data[start:]
    try:
        _parse_line(tail, 1 if start == 0 else 2)
    except ValueError:
        with open(path + ".partial", "ab") as side:                          # kept first, then cut
            side.write(tail + b"\n")
            side.flush()
            os.fsync(side.fileno())
        f.truncate(start)
        os.fsync(f.fileno())
        return (f"{path}: its last line was cut short ({len(tail)} bytes, a program stopped while writing "
                f"it); moved to {path}.partial")
    f.write(b"\n")
    os.fsync(f.fileno())
    return f"{path}: its last line had no newline; added one"


def write_feedback(path, record):
    """Append one feedback object, checked against the schema first, as an fsynced JSON line under an
    exclusive lock. Returns heal()'s message (None if the file was whole)."""
    parse_feedback(record)
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")   # fails here, before any write
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with locked(open(path, "a+b", buffering=0), exclusive=True) as f:      # unlocked when closed
        f.seek(0)
        if f.read(2) == GZIP_MAGIC:                          # a line appended to it would break the gzip file
            raise OSError(f"feedback file {path} is gzip-compressed: feedback is appended to a plain JSONL "
                          "file")
        healed = heal(f, path)
        size = f.seek(0, os.SEEK_END)
        try:
            rest = memoryview(line)
            while rest:                                      # a raw write may write only part of the line
                rest = rest[f.write(rest):]
            os.fsync(f.fileno())
        except OSError:                                      # a full disk: no half line stays behind
            f.truncate(size)
            raise
    return healed


def sft_examples(records):
    """(prompt, corrected reply) pairs from the corrections: a corrected reply is also a demonstration."""
    return [(r["prompt"], r["replies"][0]) for r in records if r["kind"] == "correction"]


def main(argv=None):
    ap = argparse.ArgumentParser(description="Check feedback JSONL files: counts per kind, the bad lines.")
    ap.add_argument("files", nargs="+", help="feedback JSONL files to check")
    args = ap.parse_args(argv)
    errors = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            records, _ = read_feedback(args.files, skip_bad=True, errors=errors)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        for line in errors[:10]:
            print("  " + line, file=sys.stderr)
        return 1
    for kind in KINDS:
        n = sum(r["kind"] == kind for r in records)
        print(f"{kind:>10}: {n} ({sum(r['tie'] for r in records if r['kind'] == kind)} ties)")
    print(f"{len(errors)} bad line(s)" + "".join("\n  " + e for e in errors[:10]))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
