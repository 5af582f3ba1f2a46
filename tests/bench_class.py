"""Benchmark: a class of 60 simulated students labelling at once on loopback (data/classroom.py), not a test.

    python tests/bench_class.py                 # 60 students, 20 s per row
    python tests/bench_class.py --students 30 --seconds 10

The server runs in its own process, as under `python chat.py --serve`, with made-up replies (the model is
not what is measured: replies are generated ahead, so a click never waits for it). Every student asks for a
task and labels it, again and again, without a pause. Two rows: the server as it runs for a class (each
student slowed to classroom.RATE requests a second), and with the flood limits lifted (what the server and
its fsynced appends can take). Then the JSONL file is checked against what the server acknowledged:
records lost, torn (not whole JSON lines) and duplicated must all be 0.
"""
import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = r'''
import sys
sys.path.insert(0, sys.argv[1])
import data.classroom as C
if sys.argv[3] == "off":
    C.RATE, C.BURST, C.IP_RATE = 1e9, 1e9, 1e9
room = C.Classroom(lambda ps: [[f"Good morrow to thee, {p}, and all thy house.", f"Away, {p}!"] for p in ps],
                   [f"prompt {i}" for i in range(10 ** 6)], sys.argv[2], "BENCH1")
server = C.start(room, "127.0.0.1", 0)
print(server.server_port, flush=True)
server.serve_forever()
'''


def student(port, name, until, out):
    """Ask for a task, label it, again and again until `until`; a refused request (the server then closes
    the connection) is waited out (429: Retry-After) and the connection opened again."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    head = {"X-Class-Code": "BENCH1", "Content-Type": "application/json"}

    def ask(method, path, body=None):
        conn.request(method, path, body=body, headers=head)
        r = conn.getresponse()
        answer = json.loads(r.read())
        if r.status != 200:
            conn.close()
            out["slowed" if r.status == 429 else "refused"] += 1
            time.sleep(float(r.getheader("Retry-After") or 1))
        return r.status, answer

    while time.monotonic() < until:
        t0 = time.monotonic()
        status, task = ask("GET", f"/api/task?student={name}")
        if status != 200:
            continue
        t1 = time.monotonic()
        status, _ = ask("POST", "/api/label", json.dumps({"student": name, "task": task["task"],
                                                            "action": "order", "order": [0, 1]}))
        if status == 200:
            out["acked"].append((name, task["task"]))
            out["task_ms"].append(1000 * (t1 - t0))
            out["label_ms"].append(1000 * (time.monotonic() - t1))
    conn.close()


def run(n_students, seconds, limits):
    path = os.path.join(tempfile.mkdtemp(), "class.jsonl")
    server = subprocess.Popen([sys.executable, "-c", SERVER, ROOT, path, limits], stdout=subprocess.PIPE,
                              text=True)
    port = int(server.stdout.readline())
    time.sleep(1)                                                   # the first tasks are generated
    outs = [{"acked": [], "task_ms": [], "label_ms": [], "slowed": 0, "refused": 0} for _ in range(n_students)]
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=student, args=(port, f"student{i:03d}", until, outs[i]))
               for i in range(n_students)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    server.terminate()
    server.wait()
    acked = [a for o in outs for a in o["acked"]]
    torn, written = 0, []
    for line in open(path, encoding="utf-8"):
        try:
            r = json.loads(line)
            written.append((r["student"], r["task"]))
        except ValueError:
            torn += 1
    label_ms = np.array([x for o in outs for x in o["label_ms"]])
    task_ms = np.array([x for o in outs for x in o["task_ms"]])
    return {"labels/s": len(acked) / elapsed, "labels": len(acked),
            "label p50/p99 ms": f"{np.percentile(label_ms, 50):.1f} / {np.percentile(label_ms, 99):.1f}",
            "task p50/p99 ms": f"{np.percentile(task_ms, 50):.1f} / {np.percentile(task_ms, 99):.1f}",
            "slowed (429)": sum(o["slowed"] for o in outs), "other refusals": sum(o["refused"] for o in outs),
            "lost": len(set(acked) - set(written)),
            "torn": torn, "duplicated": len(written) - len(set(written))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--students", type=int, default=60)
    p.add_argument("--seconds", type=float, default=20)
    a = p.parse_args()
    print(f"{a.students} students on loopback, {a.seconds:g} s per row, {os.cpu_count()} CPUs")
    rows = {"as for a class (flood limit on)": run(a.students, a.seconds, "on"),
            "flood limits lifted": run(a.students, a.seconds, "off")}
    keys = list(next(iter(rows.values())))
    print("| server | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.1f}" if isinstance(r[k], float) else str(r[k]) for k in keys)
              + " |")


if __name__ == "__main__":
    main()
