"""The classroom walkthrough, measured on a simulated class (README "The class in the browser"): not a test.

    python tests/simulate_class.py                       # needs out/sft.pt and out/rm.pt (python train_ppo.py)
    python tests/simulate_class.py --labels 1000 --students 20

1. `python chat.py --serve` starts on a free port with out/sft.pt (and out/rm.pt for the teacher's page);
2. STUDENTS simulated students label through the same HTTP routes as the page, each one of the panel's ten
   raters (student i is rater i mod 10), choosing with that rater's Plackett-Luce noise, until LABELS labels;
3. `python train_rm.py --data out/class.jsonl --mix_panel --out_dir out/class` trains the class's reward
   model (from a copy of out/sft.pt);
4. both reward models, the panel-trained out/rm.pt and the class's out/class/rm.pt, are scored on the class's
   held-out labels (the tenth of the prompts that train_rm.py holds out of --data files, by the same hash):
   how often each agrees with what the class chose. And the teacher's page numbers at the end.
"""
import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from data.feedback import read_feedback  # noqa: E402
from data.plumbing import load_checkpoint  # noqa: E402
from data.prepare import get_tokenizer  # noqa: E402
from data.panel import Panel  # noqa: E402
from reward import RewardModel, reply_scores  # noqa: E402
from train_rm import hash_unit  # noqa: E402

CODE = "SIMCLASS"


def call(conn, method, path, body=None):
    conn.request(method, path, body=json.dumps(body) if body else None,
                 headers={"X-Class-Code": CODE, "Content-Type": "application/json"})
    r = conn.getresponse()
    answer = json.loads(r.read())
    if r.status != 200:                        # the server closes the connection after a refusal
        conn.close()
        time.sleep(float(r.getheader("Retry-After") or 1))
    return r.status, answer


def student(port, i, panel, done, target, lock):
    rng, name = np.random.default_rng(i), f"sim{i:02d}"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    while True:
        with lock:
            if done[0] >= target:
                return
        status, task = call(conn, "GET", f"/api/task?student={name}")
        if status != 200:
            continue
        order, _ = panel.rank(task["replies"], rng, rater=i % 10)      # this student is rater i mod 10
        status, _ = call(conn, "POST", "/api/label", {"student": name, "task": task["task"], "action": "order",
                                                     "order": [int(j) for j in order]})
        if status == 200:
            with lock:
                done[0] += 1


def agreement(rm_path, held):
    rm = RewardModel.from_checkpoint(load_checkpoint(rm_path, made_by="train_rm.py")).eval()
    enc, right = get_tokenizer(), []
    with torch.no_grad():
        for r in held:
            sc = reply_scores(rm, enc, r["prompts"], r["replies"]).tolist()
            right.append(sc[0] > sc[1])                                # replies[0]: the class's choice
    return float(np.mean(right))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", type=int, default=1000)
    p.add_argument("--students", type=int, default=20)
    p.add_argument("--out_dir", default="out")
    p.add_argument("--screenshots", default="", help="a folder for PNGs of the student's and teacher's pages")
    a = p.parse_args()
    path, class_dir = os.path.join(a.out_dir, "class.jsonl"), os.path.join(a.out_dir, "class")
    if os.path.exists(path):
        os.remove(path)
    t0 = time.time()
    server = subprocess.Popen([sys.executable, "chat.py", "--serve", "--port", "0", "--ckpt",
                               os.path.join(a.out_dir, "sft.pt"), "--rm", os.path.join(a.out_dir, "rm.pt"),
                               "--class_code", CODE, "--class_file", path, "--max_new_tokens", "40",
                               "--temperature", "1.0", "--top_k", "0", "--top_p", "1.0"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    server.stdout.readline()                                           # class code: ...
    port = int(re.search(r":(\d+)/", server.stdout.readline()).group(1))  # students: http://host:PORT/...
    done, lock, panel = [0], threading.Lock(), Panel()
    threads = [threading.Thread(target=student, args=(port, i, panel, done, a.labels, lock))
               for i in range(a.students)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _, stats = call(http.client.HTTPConnection("127.0.0.1", port), "GET", "/api/stats?student=teacher")
    if a.screenshots:                                                  # the README's pictures of both pages
        from browser import Browser
        with Browser(width=520, height=720) as b:
            b.open(f"http://127.0.0.1:{port}/?code={CODE}")
            b.wait("document.querySelectorAll('.reply').length >= 2", timeout=120)
            open(os.path.join(a.screenshots, "class_student.png"), "wb").write(b.screenshot())
            b.open(f"http://127.0.0.1:{port}/teacher?code={CODE}")
            b.wait("document.querySelector('#stats').rows.length > 5")
            open(os.path.join(a.screenshots, "class_teacher.png"), "wb").write(b.screenshot())
    server.terminate()
    server.wait()
    t_label = time.time() - t0
    print(f"{done[0]} labels from {a.students} simulated students in {t_label:.0f} s; teacher's page: "
          f"students agree {stats['students_agree']} on {stats['agree_pairs']} pairs, panel agrees "
          f"{stats['panel_agrees']} on {stats['panel_pairs']}, reward model agrees {stats['rm_agrees']} on "
          f"{stats['rm_pairs']}")
    os.makedirs(class_dir, exist_ok=True)
    shutil.copy(os.path.join(a.out_dir, "sft.pt"), os.path.join(class_dir, "sft.pt"))
    t1 = time.time()
    subprocess.run([sys.executable, "train_rm.py", "--data", path, "--mix_panel", "--out_dir", class_dir],
                   cwd=ROOT, check=True)
    records, _ = read_feedback([path])
    held = [r for r in records if hash_unit(r["prompt"], 1337) < 0.1 and not r["tie"]]
    print(f"\nclass reward model trained in {(time.time() - t1) / 60:.1f} min; on the class's {len(held)} "
          f"held-out labels it agrees with the class {agreement(os.path.join(class_dir, 'rm.pt'), held):.3f}, "
          f"the panel-trained out/rm.pt {agreement(os.path.join(a.out_dir, 'rm.pt'), held):.3f}")


if __name__ == "__main__":
    main()
