"""The book map: every § citation in the code, the tests and the READMEs names its chapter, and the section it
names exists in that chapter (data/book_sections.json keeps the five chapters' numbered headings, so this test
runs on a fresh clone without ../shared/book)."""
import glob
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "data", "book_sections.json"), encoding="utf-8") as f:
    BOOK = json.load(f)
TAGS = tuple(BOOK)                                        # 实战框架, 流程与实践, 难点和问题, 强化对齐, 从理论到实践
FILES = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "tests", "*.py"))
               + glob.glob(os.path.join(ROOT, "data", "*.py")) + [os.path.join(ROOT, "README.md"),
                                                                  os.path.join(ROOT, "data", "README.md")])
FILES.remove(os.path.abspath(__file__))                   # this file writes about the format itself
# a citation: [TAG §4.2.3], also [TAG §4.2.1-§4.2.2] or [TAG §3.1, §3.3]: every § inside the brackets
CITATION = re.compile(r"\[(" + "|".join(TAGS) + r") (§[\d.]+(?:\s*(?:,|-|–|and)\s*§[\d.]+)*)\]")


def citations():
    for path in FILES:
        text = open(path, encoding="utf-8").read()
        for m in CITATION.finditer(text):
            for number in re.findall(r"§([\d.]+)", m.group(2)):
                yield os.path.relpath(path, ROOT), text[:m.start()].count("\n") + 1, m.group(1), number.rstrip(".")


def test_the_five_chapters_are_listed_with_their_sections():
    assert set(TAGS) == {"实战框架", "流程与实践", "难点和问题", "强化对齐", "从理论到实践"}
    for tag, chapter in BOOK.items():
        assert chapter["title"] and len(chapter["sections"]) > 10, tag
    assert BOOK["实战框架"]["sections"]["4.2.3"] == "广义优势估计"
    assert BOOK["实战框架"]["sections"]["4.1.2"] == "position encoding"
    assert BOOK["流程与实践"]["sections"]["3.2"] == "人类反馈收集"


def test_every_cited_section_exists_in_its_chapter():
    found = list(citations())
    assert len(found) > 60                                # the code and the README cite the book throughout
    missing = [f"{path}:{line}: [{tag} §{n}]" for path, line, tag, n in found if n not in BOOK[tag]["sections"]]
    assert not missing, "cited sections that the chapter does not have:\n" + "\n".join(missing)


def test_every_section_sign_carries_its_chapter():
    """A bare §4.2 means different things in different chapters: every § sits inside a tagged citation."""
    bare = []
    for path in FILES:
        text = open(path, encoding="utf-8").read()
        spans = [m.span() for m in CITATION.finditer(text)]
        for m in re.finditer(r"§\d", text):
            if not any(a <= m.start() < b for a, b in spans):
                bare.append(f"{os.path.relpath(path, ROOT)}:{text[:m.start()].count(chr(10)) + 1}")
    assert not bare, "section numbers without a chapter tag: " + ", ".join(bare)
