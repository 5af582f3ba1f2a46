"""The class in the browser (data/classroom.py, `python chat.py --serve`): a real headless Chromium clicks a
reply and train_rm.py reads the record; the door (class code, bounded bodies, the flood limit, only the
server's own routes); escaping; several students at once and a kill -9 lose nothing."""
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import data.classroom as C
from browser import Browser, find_chromium
from conftest import ROOT, TINY_RM, pipeline  # noqa: F401
from data.feedback import read_feedback

CODE = "ABCD23"
EVIL = "<script>window.pwned=1</script><img src=x onerror=\"window.pwned=2\"> kind sir"


def fake_replies(prompts):
    return [[f"a reply to {p}", f"another reply to {p}", EVIL] for p in prompts]


@pytest.fixture
def room(tmp_path):
    """A class with made-up replies (no model) on a free port: (Classroom, port)."""
    room = C.Classroom(lambda ps: [r[:2] for r in fake_replies(ps)], [f"prompt {i}" for i in range(200)],
                       str(tmp_path / "class.jsonl"), CODE, judge=lambda a, b: a < b)
    server = C.start(room, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield room, server.server_port
    room.stop.set()
    server.shutdown()
    server.server_close()


def request(port, method, path, body=None, code=CODE, raw=None, headers=None):
    """(status, JSON answer, headers) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"X-Class-Code": code, **(headers or {})})
    r = conn.getresponse()
    text = r.read()
    conn.close()
    return r.status, json.loads(text) if r.getheader("Content-Type") == "application/json" else text, r


def task(port, student="stud1"):
    status, t, _ = request(port, "GET", f"/api/task?student={student}")
    assert status == 200, t
    return t


def lines(room):
    return open(room.path).read().splitlines() if os.path.exists(room.path) else []


def chromium_or_skip():
    if find_chromium() is None:
        if os.environ.get("CI"):                                   # .ci/run installs it: never skipped there
            pytest.fail("no Chromium: .ci/run installs Debian's chromium package")
        pytest.skip("no Chromium on this machine (apt-get install chromium)")


# ---- the whole loop: a browser, a real model, train_rm.py ---------------------------------------------------

def test_a_click_in_chromium_is_a_record_that_train_rm_reads(pipeline, tmp_path):
    chromium_or_skip()
    d, _ = pipeline
    out = tmp_path / "class.jsonl"
    server = subprocess.Popen([sys.executable, "chat.py", "--serve", "--port", "0", "--ckpt", str(d / "sft.pt"),
                               "--rm", str(d / "rm.pt"), "--class_code", CODE, "--class_file", str(out),
                               "--max_new_tokens", "8", "--device", "cpu"], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        first = server.stdout.readline()
        assert first.startswith(f"class code: {CODE}"), first
        url = server.stdout.readline().split("students: ")[1].strip()
        with Browser() as b:
            b.open(url)
            b.wait("document.querySelectorAll('.reply').length >= 2", timeout=120)
            for n in (1, 2, 3):                                   # a click, a key press, a click
                shown = b.eval("task.task")                       # (the page's own state: a click while
                if n == 2:                                        # the next task loads is ignored)
                    b.key("2")
                else:
                    b.eval("document.querySelectorAll('.reply')[0].click()")
                b.wait(f"document.querySelector('#count').textContent.includes('{n})')", timeout=120)
                b.wait(f"task && task.task !== {json.dumps(shown)} && !busy", timeout=120)
            b.open(url.replace("/?code=", "/teacher?code="))
            b.wait("document.querySelector('#stats').rows.length > 5")
            assert "labels3" in b.eval("document.querySelector('#stats').innerText").replace("\t", "")
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
    records, _ = read_feedback([str(out)])
    assert len(records) == 3 and all(r["kind"] == "comparison" and r["meta"]["source"] == "class" for r in records)
    assert records[0]["meta"]["student"].startswith("s-") and records[0]["meta"]["checkpoint"].endswith("sft.pt")
    (tmp_path / "rm").mkdir()
    os.link(d / "sft.pt", tmp_path / "rm" / "sft.pt")
    r = subprocess.run([sys.executable, "train_rm.py", "--data", str(out), "--mix_panel", "--out_dir",
                        str(tmp_path / "rm"), *TINY_RM.split()], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"read 3 feedback records from {out}" in r.stdout and (tmp_path / "rm" / "rm.pt").exists()


def test_a_reply_or_correction_holding_script_is_shown_not_run(tmp_path):
    chromium_or_skip()
    room = C.Classroom(fake_replies, ["Hail, good sir"] * 20, str(tmp_path / "c.jsonl"), CODE, k=3)
    server = C.start(room, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with Browser() as b:
        b.open(f"http://127.0.0.1:{server.server_port}/?code={CODE}")
        b.wait("document.querySelectorAll('.reply').length == 3")
        assert EVIL in b.eval("document.querySelector('#replies').innerText")      # shown as text
        shown = b.eval("task.task")
        b.eval("document.querySelector('#fix').click()")
        b.eval(f"document.querySelector('#fixtext').value = {json.dumps(EVIL)}")
        b.eval("document.querySelector('#fixsave').click()")
        b.wait("document.querySelector('#count').textContent.includes('1)')")
        b.wait(f"task && task.task !== {json.dumps(shown)} && !busy")       # the next task is shown
        b.eval("document.querySelector('#own').click()")
        b.eval(f"document.querySelector('#owntext').value = {json.dumps(EVIL)}")
        b.eval("document.querySelector('#ownask').click()")
        b.wait(f"document.querySelector('#prompt').textContent === {json.dumps(EVIL)}")
        assert b.eval("String(window.pwned)") == "undefined" and b.eval("document.images.length") == 0
        for i in (2, 0, 1):                                          # K = 3: click them best first, a ranking
            b.eval(f"document.querySelectorAll('.reply')[{i}].click()")
        b.wait("document.querySelector('#count').textContent.includes('2)')")
    room.stop.set()
    server.shutdown()
    correction, ranking = read_feedback([room.path])[0]
    assert correction["kind"] == "correction" and correction["replies"][0] == EVIL.strip()   # as written
    assert ranking["kind"] == "ranking" and ranking["replies"] == [fake_replies([EVIL])[0][i] for i in (2, 0, 1)]


# ---- the door --------------------------------------------------------------------------------------------------

def test_a_wrong_or_missing_class_code_is_refused_and_nothing_written(room):
    room, port = room
    t = task(port)
    for code in ("", "abcd23", "ABCD24", CODE + "x"):
        status, answer, _ = request(port, "POST", "/api/label", {"student": "stud1", "task": t["task"],
                                                                 "action": "order", "order": [0, 1]}, code=code)
        assert status == 401 and "class code" in answer["error"]
    assert request(port, "GET", "/api/stats?student=teach", code="")[0] == 401
    assert lines(room) == [] and room.stats()["refused"] == 5


@pytest.mark.parametrize("raw, status, why", [
    (b"x" * (C.MAX_BODY + 1), 413, "larger than"), (b"{not json", 400, "not JSON"), (b"[1, 2]", 400, "JSON object"),
    (b"\xff\xfe", 400, "not JSON"), (json.dumps({"student": "s!", "task": "t"}).encode(), 400, "student must be"),
    (json.dumps({"student": "stud1", "task": "nope", "action": "order", "order": [0, 1]}).encode(), 400,
     "unknown task"),
])
def test_malformed_or_oversized_bodies_are_refused_and_nothing_written(room, raw, status, why):
    room, port = room
    code, answer, _ = request(port, "POST", "/api/label", raw=raw, headers={"Content-Type": "application/json"})
    assert code == status and why in answer["error"] and lines(room) == []


@pytest.mark.parametrize("label, why", [
    ({"action": "order", "order": [0, 0]}, "order must list"), ({"action": "order", "order": [0, 1, 2]}, "order"),
    ({"action": "order", "order": [True, False]}, "order must list"), ({"action": "order"}, "order must list"),
    ({"action": "correct", "reply": 0, "text": "   "}, "a correction is"),
    ({"action": "correct", "reply": 5, "text": "fine"}, "reply must be"),
    ({"action": "correct", "reply": 0, "text": "x" * (C.MAX_TEXT + 1)}, "a correction is"),
    ({"action": "vote"}, "action must be"),
])
def test_bad_fields_are_refused_and_the_task_can_still_be_answered(room, label, why):
    room, port = room
    t = task(port)
    status, answer, _ = request(port, "POST", "/api/label", {"student": "stud1", "task": t["task"], **label})
    assert status == 400 and why in answer["error"] and lines(room) == []
    status, _, _ = request(port, "POST", "/api/label", {"student": "stud1", "task": t["task"], "action": "tie"})
    assert status == 200 and len(lines(room)) == 1


def test_only_the_servers_own_routes_exist(room):
    room, port = room
    for method, path in (("GET", "/etc/passwd"), ("GET", "/../data/class.html"), ("GET", "/class.html"),
                         ("GET", "/api/label"), ("POST", "/api/task"), ("GET", "/data/classroom.py")):
        status, answer, _ = request(port, method, path, raw=b"{}" if method == "POST" else None)
        assert status == 404, (method, path)
    status, page, r = request(port, "GET", "/")
    assert status == 200 and b"textContent" in page and "script-src 'sha256-" in r.getheader(
        "Content-Security-Policy")                                   # no script but the page's own runs
    assert request(port, "POST", "/api/label", raw=b"{}", headers={"Content-Length": "abc"})[0] in (400, 411)


def test_a_label_is_taken_once_and_only_for_a_task_the_student_was_shown(room):
    room, port = room
    t = task(port, "stud1")
    mine = {"task": t["task"], "action": "order", "order": [1, 0]}
    assert request(port, "POST", "/api/label", {"student": "stud2", **mine})[0] == 400      # not shown to stud2
    assert request(port, "POST", "/api/label", {"student": "stud1", **mine})[1]["count"] == 1
    assert request(port, "POST", "/api/label", {"student": "stud1", **mine})[0] == 409      # a retried click
    record = json.loads(lines(room)[0])
    assert len(lines(room)) == 1 and record["chosen"] == t["replies"][1] and record["student"] == "stud1"


def test_one_student_alone_never_runs_out_of_tasks(room, monkeypatch):
    room, port = room
    monkeypatch.setattr(C, "RATE", 1e6)                           # this student may be quick
    for _ in range(3 * C.READY * C.SHOWN):                        # more than the queue holds
        t = task(port, "alone1")
        assert request(port, "POST", "/api/label", {"student": "alone1", "task": t["task"], "action": "skip"})[0] == 200
    assert room.stats()["skips"] == 3 * C.READY * C.SHOWN and lines(room) == []


def test_a_flooding_student_is_slowed_and_the_others_are_not(room):
    room, port = room
    t0, answers = time.monotonic(), [request(port, "GET", "/api/stats?student=flood1")[0] for _ in range(60)]
    allowed = C.BURST + C.RATE * (time.monotonic() - t0) + 1
    assert answers.count(429) > 0 and answers.count(200) <= allowed
    status, _, r = request(port, "GET", "/api/stats?student=flood1")
    assert status == 429 and int(r.getheader("Retry-After")) >= 1
    assert request(port, "GET", "/api/stats?student=calm1")[0] == 200                     # another student


# ---- several writers, and a kill -9 ------------------------------------------------------------------------

def label_forever(port, student, acked, stop):
    """A student who labels as fast as the server lets them: every acknowledged task id goes in `acked`."""
    while not stop.is_set():
        try:
            status, t, r = request(port, "GET", f"/api/task?student={student}")
            if status == 429:
                time.sleep(float(r.getheader("Retry-After")))
                continue
            if status != 200:
                return
            status, _, r = request(port, "POST", "/api/label", {"student": student, "task": t["task"],
                                                                 "action": "order", "order": [0, 1]})
            if status == 200:
                acked.append((student, t["task"]))
            elif status == 429:
                time.sleep(float(r.getheader("Retry-After")))
        except (OSError, http.client.HTTPException):
            return                                                   # the server is gone


def test_twelve_students_at_once_lose_nothing_and_agreement_is_counted(room):
    room, port = room
    acked, stop = [], threading.Event()
    students = [threading.Thread(target=label_forever, args=(port, f"stud{i:02d}", acked, stop)) for i in range(12)]
    for s in students:
        s.start()
    time.sleep(3)
    stop.set()
    for s in students:
        s.join()
    records = [json.loads(x) for x in lines(room)]
    assert sorted((r["student"], r["task"]) for r in records) == sorted(acked) and len(acked) > 20
    stats = room.stats()
    assert stats["labels"] == len(acked) and stats["students"] == 12 and stats["agree_pairs"] > 0
    assert stats["students_agree"] == 1.0 and stats["panel_pairs"] == len(acked)   # all chose reply 0


SERVER = r'''
import sys
sys.path.insert(0, sys.argv[1])
import data.classroom as C
room = C.Classroom(lambda ps: [[f"a reply to {p} " * 40, f"another reply to {p} " * 40] for p in ps],
                   [f"prompt {i}" for i in range(100000)], sys.argv[2], "ABCD23")
server = C.start(room, "127.0.0.1", 0)
print(server.server_port, flush=True)
server.serve_forever()
'''


def test_a_kill_9_mid_write_leaves_a_file_train_rm_reads_with_every_acknowledged_label(tmp_path):
    path = tmp_path / "class.jsonl"
    server = subprocess.Popen([sys.executable, "-c", SERVER, ROOT, str(path)], stdout=subprocess.PIPE, text=True)
    port = int(server.stdout.readline())
    acked, stop = [], threading.Event()
    students = [threading.Thread(target=label_forever, args=(port, f"stud{i:02d}", acked, stop)) for i in range(8)]
    for s in students:
        s.start()
    time.sleep(2)
    server.send_signal(signal.SIGKILL)                               # in the middle of the appends
    server.wait()
    stop.set()
    for s in students:
        s.join()
    records, bad = read_feedback([str(path)])                        # train_rm.py's reader: every line whole
    written = {(r["meta"]["student"], r["meta"]["task"]) for r in records}
    assert bad == 0 and len(acked) > 10 and set(acked) <= written and len(written) == len(records)


@pytest.mark.parametrize("body, status", [
    ({"student": "stud1", "task": "T", "action": "order", "order": ["x", 1]}, 400),
    ({"student": "stud1", "task": "T", "action": "order", "order": [None, None]}, 400),
    ({"student": "stud1", "task": "T", "action": "correct", "reply": 0, "text": "\ud800 lone surrogate"}, 400),
])
def test_odd_values_are_a_4xx_and_the_server_keeps_serving(room, body, status):
    room, port = room
    t = task(port)
    body = {**body, "task": t["task"]}
    code, answer, r = request(port, "POST", "/api/label", raw=json.dumps(body).encode())
    assert code == status and "error" in answer and r.getheader("Connection") == "close" and lines(room) == []
    assert request(port, "POST", "/api/label", {"student": "stud1", "task": t["task"], "action": "skip"})[0] == 200


def test_deep_json_and_odd_lengths_are_refused(room):
    room, port = room
    assert request(port, "POST", "/api/label", raw=b"[" * 4000 + b"]" * 4000)[0] == 400   # 8,000 bytes, too deep
    assert request(port, "POST", "/api/label", raw=b"{}", headers={"Content-Length": "\u00b2"})[0] == 411


def test_rotating_student_ids_from_one_address_is_slowed(room):
    room, port = room
    answers = [request(port, "GET", f"/api/stats?student=rot{i:04d}")[0] for i in range(C.NEW_IDS_BURST + 20)]
    assert answers[:C.NEW_IDS_BURST].count(200) >= C.NEW_IDS_BURST - 2 and answers[-10:].count(429) >= 8


def test_a_generator_that_fails_is_reported_not_a_silent_wait(tmp_path):
    def broken(prompts):
        raise MemoryError("no room for the replies")
    room = C.Classroom(broken, ["a prompt"] * 5, str(tmp_path / "c.jsonl"), CODE)
    server = C.start(room, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    status, answer, _ = request(server.server_port, "GET", "/api/task?student=stud1")
    assert status == 500 and "the model failed to write replies (MemoryError" in answer["error"]
    room.stop.set()
    server.shutdown()
