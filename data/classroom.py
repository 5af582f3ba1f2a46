"""
The class is the human ([流程与实践 §3.2] 人类反馈收集, [实战框架 §3.4.3] 实时反馈处理): `python chat.py --serve`
serves the Bard's replies to a room of students, each in a browser, and appends their labels to one JSONL
file that `train_rm.py --data` reads.

    python chat.py --serve                                   # http://127.0.0.1:8000/  (this machine only)
    python chat.py --serve --host 0.0.0.0 --port 8000        # the classroom network: URL and class code
    mkdir -p out/class && cp out/sft.pt out/class/           # then the class's reward model:
    python train_rm.py --data out/class.jsonl --mix_panel --out_dir out/class

The student's page (/) shows a prompt from the held-out plays (or one the student types) and K replies of
the loaded model; the student picks the better one (K = 2: a comparison), orders them (K > 2: a
ranking), calls a tie, skips, or writes a better reply (a correction). The teacher's page (/teacher)
shows the counts, how often two students agree on the same pair, and how often the panel and the reward
model agree with the class. Each task is shown to SHOWN students, so agreement can be measured.

What it guarantees:
  - one JSONL, nothing lost: a label is acknowledged only after data.feedback.write_feedback has appended
    it (an exclusive lock, flushed and fsynced, a cut-short last line mended first); a label is taken once
    per student and task (a retried click is refused, not written twice);
  - nobody in who does not belong: every /api/ request needs the class code (X-Class-Code header);
    bodies are at most MAX_BODY bytes of a JSON object with bounded fields; anything else is a 4xx with
    a message and changes nothing; a student who sends more than RATE requests a second (BURST at once)
    is slowed (429, Retry-After), so is an address (IP_RATE); only the routes below exist (no file is
    served by its path);
  - every text a page shows (prompts, replies, corrections) is set as text (textContent), never as HTML.
What it simplifies: one model, one process; the students are anonymous ids kept in their browser; the
replies are generated ahead by one thread, READY tasks at a time; no accounts, no HTTPS (a class code on
a local network, not a secret on the internet).
"""
import base64
import hashlib
import hmac
import http.server
import json
import os
import re
import secrets
import socket
import threading
import time
import urllib.parse
from datetime import datetime, timezone

from data.feedback import check_writable, write_feedback
from data.prepare import format_prompt

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "class.html")
MAX_BODY = 8192          # bytes of a request body
MAX_TEXT = 1000          # characters of a typed prompt or correction
MAX_STUDENTS = 1000      # anonymous ids in one class (more: the class is full)
RATE, BURST = 5.0, 20    # requests per second per student (a token bucket), and how many at once
IP_RATE = 400.0          # requests per second per address (a classroom behind one router shares one)
NEW_IDS, NEW_IDS_BURST = 1.0, 100   # new student ids per second per address, and at once (a whole class)
READY = 16               # tasks generated ahead
SHOWN = 2                # students who see each task: two answers to one task measure agreement
STUDENT = re.compile(r"[A-Za-z0-9_-]{4,40}")


class Refused(Exception):
    """A request turned down: its HTTP status and one line for the page."""
    def __init__(self, status, message, retry_after=None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


class Bucket:
    """A token bucket: `rate` requests a second on average, `burst` at once."""
    def __init__(self, rate, burst):
        self.rate, self.burst, self.tokens, self.t = rate, burst, float(burst), time.monotonic()

    def take(self):
        """None if the request may go ahead, else the seconds to wait."""
        now = time.monotonic()
        self.tokens, self.t = min(self.burst, self.tokens + (now - self.t) * self.rate), now
        if self.tokens >= 1:
            self.tokens -= 1
            return None
        return (1 - self.tokens) / self.rate


class Classroom:
    """One class: the tasks (replies generated ahead), who saw and answered which, the labels' counts.

    replies(prompts) -> for each prompt a list of K distinct reply texts (fewer than 2: the prompt is
    dropped); prompts: the held-out prompts to go through, in order; path: the JSONL file; judge(chosen,
    rejected) -> True/False/None, whether the panel agrees (None: it cannot tell them apart); scores(prompt,
    replies) -> the reward model's scores (or None). Two locks: self.more (a Condition) guards the tasks
    and the queue, self.lock the answers, the buckets and the counts; a task, once made, only gains viewers,
    so reading one needs no lock; appends happen outside both (write_feedback locks the file)."""

    def __init__(self, replies, prompts, path, code, k=2, judge=None, scores=None, checkpoint=""):
        check_writable(path)
        self.replies, self.prompts, self.path, self.code, self.k = replies, list(prompts), path, code, k
        self.judge, self.scores, self.checkpoint = judge, scores, checkpoint
        self.lock, self.more = threading.Lock(), threading.Condition()
        self.tasks, self.queue, self.next_prompt = {}, [], 0     # id -> task; ids still to be shown
        self.answers = {}                                        # (student, task id) -> the label or "skip"
        self.buckets, self.ip_buckets, self.counts = {}, {}, {"labels": 0, "skips": 0, "refused": 0}
        self.new_ids, self.asking = {}, set()      # per address: a bucket of new ids; students asking now
        self.stop, self.broken = threading.Event(), None                     # broken: why the generator died
        self.filler = threading.Thread(target=self.fill, daemon=True)

    # ---- tasks ----------------------------------------------------------------------------------------
    def fill(self):
        """The generator thread: keep READY tasks that nobody has seen yet waiting (a task's other views
        wait too, for other students), from the held-out prompts."""
        def fresh():
            return sum(not self.tasks[tid]["seen"] for tid in set(self.queue))
        while not self.stop.is_set() and self.next_prompt < len(self.prompts):
            with self.more:
                self.more.wait_for(lambda: fresh() < READY or self.stop.is_set(), timeout=1)
                if fresh() >= READY or self.stop.is_set():
                    continue
            batch = self.prompts[self.next_prompt:self.next_prompt + READY]
            try:
                made = self.replies(batch)
            except Exception as e:                                        # out of memory, a broken model
                self.broken = f"the model failed to write replies ({type(e).__name__}: {str(e)[:200]})"
                print(f"error: {self.broken}; the class gets no new tasks", flush=True)
                return
            self.next_prompt += len(batch)
            for prompt, replies in zip(batch, made):
                self.add_task(prompt, replies, views=SHOWN)

    def add_task(self, prompt, replies, views=SHOWN, student=None):
        """A new task (None if its replies are fewer than 2 distinct texts): queued for `views` students,
        or (student given) served to that student only."""
        replies = list(dict.fromkeys(replies))
        if len(replies) < 2:
            return None
        task = {"id": secrets.token_hex(6), "prompt": prompt, "replies": replies,
                "scores": self.scores(prompt, replies) if self.scores else None, "seen": set()}
        with self.more:
            self.tasks[task["id"]] = task
            if student is None:
                self.queue += [task["id"]] * views
            else:
                task["seen"].add(student)
            self.more.notify_all()
        return task

    def task_for(self, student, wait=10.0):
        """The next task this student has not seen, waiting up to `wait` seconds for the generator."""
        deadline = time.monotonic() + wait
        with self.more:
            while True:
                for i, tid in enumerate(self.queue):
                    if student not in self.tasks[tid]["seen"]:
                        del self.queue[i]
                        self.tasks[tid]["seen"].add(student)
                        self.more.notify_all()
                        return self.public(self.tasks[tid])
                left = deadline - time.monotonic()
                if self.broken:
                    raise Refused(500, self.broken + ": tell your teacher")
                if left <= 0 or (self.next_prompt >= len(self.prompts) and not self.filler.is_alive()):
                    if left <= 0:
                        raise Refused(503, "no reply is ready yet: try again in a moment", retry_after=1)
                    raise Refused(410, "every prompt of this class has been labelled: ask your teacher")
                self.more.wait(timeout=left)

    @staticmethod
    def public(task):
        return {"task": task["id"], "prompt": task["prompt"], "replies": task["replies"]}

    # ---- labels ---------------------------------------------------------------------------------------
    def label(self, student, body):
        """Check one label against the task this student was shown; append it (nothing for a skip)."""
        task = self.tasks.get(body.get("task")) if isinstance(body.get("task"), str) else None
        if task is None or student not in task["seen"]:
            raise Refused(400, "unknown task: ask for a new one")
        record = self.record(task, body)                                     # Refused if malformed
        key = (student, task["id"])
        with self.lock:
            if key in self.answers:
                raise Refused(409, "you have already answered this task")
            self.answers[key] = "pending"
        if record is not None:
            record.update(student=student, task=task["id"], checkpoint=self.checkpoint, source="class",
                          time=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            try:
                write_feedback(self.path, record)
            except (OSError, ValueError) as e:
                with self.lock:
                    del self.answers[key]                                    # not written: may be sent again
                if isinstance(e, OSError):
                    raise Refused(500, f"not saved ({e}): send it again") from None
                raise Refused(400, f"not saved: {e}") from None               # e.g. text that is not UTF-8
        with self.lock:
            self.answers[key] = record or "skip"
            self.counts["labels" if record else "skips"] += 1
            mine = sum(1 for (s, _), a in self.answers.items() if s == student and a != "skip")
        return {"ok": True, "saved": record is not None, "count": mine}

    def record(self, task, body):
        """The feedback record (data/README.md's schema) a label makes, or None for a skip."""
        action, replies = body.get("action"), task["replies"]
        prompt = format_prompt(task["prompt"])
        if action == "skip":
            return None
        if action == "tie":
            if len(replies) != 2:
                raise Refused(400, "a tie is between two replies")
            return {"kind": "comparison", "prompt": prompt, "chosen": replies[0], "rejected": replies[1],
                    "tie": True}
        if action == "order":
            order = body.get("order")
            if not (isinstance(order, list) and all(type(i) is int for i in order)
                    and sorted(order) == list(range(len(replies)))):
                raise Refused(400, f"order must list the {len(replies)} replies' numbers, best first")
            if len(replies) == 2:
                return {"kind": "comparison", "prompt": prompt, "chosen": replies[order[0]],
                        "rejected": replies[order[1]]}
            return {"kind": "ranking", "prompt": prompt, "replies": [replies[i] for i in order]}
        if action == "correct":
            i, text = body.get("reply"), body.get("text")
            if not (type(i) is int and 0 <= i < len(replies)):
                raise Refused(400, "reply must be the number of the reply you improve")
            if not (isinstance(text, str) and text.strip() and len(text) <= MAX_TEXT):
                raise Refused(400, f"a correction is 1 to {MAX_TEXT} characters of text")
            return {"kind": "correction", "prompt": prompt, "reply": replies[i], "corrected": text.strip()}
        raise Refused(400, "action must be order, tie, skip or correct")

    def own_prompt(self, student, body):
        """A task for a prompt the student typed (generated now, shown to this student only)."""
        text = body.get("prompt")
        if not (isinstance(text, str) and text.strip() and len(text) <= MAX_TEXT):
            raise Refused(400, f"a prompt is 1 to {MAX_TEXT} characters of text")
        with self.lock:
            if student in self.asking:
                raise Refused(429, "your last prompt is still being answered", retry_after=1)
            self.asking.add(student)
        try:
            task = self.add_task(text.strip(), self.replies([text.strip()])[0], student=student)
        finally:
            with self.lock:
                self.asking.discard(student)
        if task is None:
            raise Refused(503, "the model gave the same reply every time: try another prompt")
        return self.public(task)

    # ---- the door ------------------------------------------------------------------------------------
    def admit(self, code, student, address):
        """Refuse a wrong class code, a malformed student id, a full class or a flood (429)."""
        with self.lock:
            wait = self.ip_buckets.setdefault(address, Bucket(IP_RATE, 2 * IP_RATE)).take()
            if wait is None and not hmac.compare_digest(str(code).encode(), self.code.encode()):
                self.counts["refused"] += 1
                raise Refused(401, "wrong or missing class code")
            if wait is None and not (isinstance(student, str) and STUDENT.fullmatch(student)):
                raise Refused(400, "student must be 4 to 40 letters, digits, - or _")
            if wait is None and student not in self.buckets:
                if len(self.buckets) >= MAX_STUDENTS:
                    raise Refused(429, f"the class is full ({MAX_STUDENTS} students)")
                wait = self.new_ids.setdefault(address, Bucket(NEW_IDS, NEW_IDS_BURST)).take()  # no rotation
            wait = wait or self.buckets.setdefault(student, Bucket(RATE, BURST)).take()
        if wait is not None:
            raise Refused(429, "too many requests: slow down", retry_after=wait)

    # ---- the teacher's view ----------------------------------------------------------------------------
    def stats(self, student=None, body=None):
        """Counts; agreement between students on the same task; the panel's and the reward model's
        agreement with the class's comparisons; the commands to train on what was collected."""
        with self.lock:
            labels = [(s, tid, a) for (s, tid), a in self.answers.items() if isinstance(a, dict)]
            counts = dict(self.counts)
        kinds = {}
        for _, _, a in labels:
            kinds[a["kind"]] = kinds.get(a["kind"], 0) + 1
        by_task, panel, rm = {}, [], []
        for s, tid, a in labels:
            if a["kind"] != "comparison":
                continue
            choice = "tie" if a.get("tie") else a["chosen"]
            by_task.setdefault(tid, []).append(choice)
            if a.get("tie"):
                continue
            if self.judge and (verdict := self.judge(a["chosen"], a["rejected"])) is not None:
                panel.append(verdict)
            sc = self.tasks[tid]["scores"]
            if sc is not None:
                rs = self.tasks[tid]["replies"]
                rm.append(sc[rs.index(a["chosen"])] > sc[rs.index(a["rejected"])])
        pairs = [(x[i], x[j]) for x in by_task.values() for i in range(len(x)) for j in range(i + 1, len(x))]
        share = lambda xs: round(sum(xs) / len(xs), 3) if xs else None       # noqa: E731
        return {**counts, "students": len({s for s, _, _ in labels}), "kinds": kinds,
                "students_agree": share([a == b for a, b in pairs]), "agree_pairs": len(pairs),
                "panel_agrees": share(panel), "panel_pairs": len(panel), "rm_agrees": share(rm),
                "rm_pairs": len(rm), "file": self.path,
                "commands": ["mkdir -p out/class && cp out/sft.pt out/class/   # the class starts from SFT",
                             f"python train_rm.py --data {self.path} --mix_panel --out_dir out/class",
                             "python train_ppo.py --out_dir out/class",
                             "python chat.py --ckpt out/class/ppo.pt --rm out/class/rm.pt"]}


ROUTES = {("GET", "/api/task"): lambda room, student, body: room.task_for(student),
          ("POST", "/api/label"): Classroom.label,
          ("POST", "/api/prompt"): Classroom.own_prompt,
          ("GET", "/api/stats"): Classroom.stats}


class Handler(http.server.BaseHTTPRequestHandler):
    """The server's only routes: the two pages, and ROUTES; everything else is a 404."""
    server_version, protocol_version = "BardClass/1", "HTTP/1.1"
    timeout = 30                                   # seconds a connection may stall: no thread held forever

    def setup(self):
        super().setup()                            # headers and body are two writes: without NODELAY the
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)    # body waits ~40 ms (Nagle)

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def route(self, method):
        room, url = self.server.room, urllib.parse.urlsplit(self.path)
        try:
            if method == "GET" and url.path in ("/", "/teacher"):
                return self.send(200, self.server.page, "text/html; charset=utf-8")
            if (method, url.path) not in ROUTES:
                raise Refused(404, f"no such page: {url.path[:80]}")
            body = self.body() if method == "POST" else dict(urllib.parse.parse_qsl(url.query))
            room.admit(self.headers.get("X-Class-Code", ""), body.get("student"), self.client_address[0])
            self.send_json(200, ROUTES[method, url.path](room, body["student"], body))
        except Refused as e:
            self.close_connection = True                       # a body not read must not be the next request
            self.send_json(e.status, {"error": e.message}, e.retry_after)
        except Exception as e:                                 # a bug of ours: a 500, not a dead connection
            print(f"error: {method} {url.path[:80]}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            self.close_connection = True
            self.send_json(500, {"error": "the server failed on this request; nothing was saved"})

    def body(self):
        """The request's JSON object, at most MAX_BODY bytes (the whole body is read, so the connection
        stays usable for the next request)."""
        length = self.headers.get("Content-Length", "")
        if not (length.isascii() and length.isdigit()):
            raise Refused(411, "a POST needs a Content-Length")
        if int(length) > MAX_BODY:
            raise Refused(413, f"the request is larger than {MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(int(length)).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise Refused(400, "the request is not JSON") from None
        if not isinstance(body, dict):
            raise Refused(400, "the request must be a JSON object")
        return body

    def send_json(self, status, obj, retry_after=None):
        headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after else {}
        if self.close_connection:
            headers["Connection"] = "close"
        self.send(status, json.dumps(obj).encode(), "application/json", headers)

    def send(self, status, data, kind, headers=()):
        self.send_response(status)
        for k, v in {"Content-Type": kind, "Content-Length": str(len(data)), "Cache-Control": "no-store",
                     "X-Content-Type-Options": "nosniff", **dict(headers),
                     "Content-Security-Policy": self.server.policy}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):                                      # quiet: the teacher's terminal
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True          # a thread per request, ended with the server
    request_queue_size = 128       # connections waiting to be accepted (5 by default: a class reconnecting
                                   # at once would wait a second for the kernel to retry)


def start(room, host="127.0.0.1", port=8000):
    """The server, listening (port 0: any free one), with its generator thread running; serve_forever()
    in a thread of the caller's (or in the foreground: serve())."""
    server = Server((host, port), Handler)
    server.room = room
    with open(PAGE, "rb") as f:
        server.page = f.read()
    script = server.page.rsplit(b"<script>", 1)[1].split(b"</script>")[0]  # the page's one script
    digest = base64.b64encode(hashlib.sha256(script).digest()).decode()
    server.policy = (f"default-src 'none'; connect-src 'self'; style-src 'unsafe-inline'; "
                     f"script-src 'sha256-{digest}'")                  # no other script runs, injected or not
    room.filler.start()
    return server


def serve(room, host, port):
    """`python chat.py --serve`: print the URLs and the class code, serve until Ctrl-C."""
    server = start(room, host, port)
    url = f"http://{address(host)}:{server.server_port}"
    print(f"class code: {room.code}\n  students: {url}/?code={room.code}\n  teacher:  {url}/teacher?code="
          f"{room.code}\nlabels go to {room.path}; Ctrl-C ends the class", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"\nclass closed: {room.counts['labels']} labels in {room.path}")
    finally:
        room.stop.set()
        server.server_close()
    return 0


def address(host):
    """The address students type: this machine's on the classroom network when listening on all of them
    (a UDP socket "connected" outwards names it; nothing is sent)."""
    if host not in ("0.0.0.0", ""):
        return host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.254.254.254", 1))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def class_code():
    """Six letters and digits that cannot be misread (no 0/O, 1/I/L)."""
    return "".join(secrets.choice("ABCDEFGHJKMNPQRSTUVWXYZ23456789") for _ in range(6))
