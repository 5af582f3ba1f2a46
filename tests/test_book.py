"""The book map: every § citation in the code, the tests and the READMEs names its chapter, the section it
names exists in that chapter, and a heading written beside it is that section's heading (the rules are in the
comment above heading_claims; data/book_sections.json keeps the five chapters' numbered headings, so this test
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
               + glob.glob(os.path.join(ROOT, "data", "*.py"))
               + [os.path.join(ROOT, f) for f in ("README.md", "data/README.md", "tests/README.md",
                                                  "tests/README_zh.md")])
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


# ---- the heading beside a citation ----------------------------------------------------------------------
# Where a citation is written with a heading beside it, that heading is the chapter's own for that section.
# Two places carry one:
#   * a table whose second column is headed "heading" (or 标题), a row whose first cell is one citation
#     alone: `| [实战框架 §4.2.3] | 广义优势估计 | ...`. The cell must BE the heading, character for character.
#   * a citation followed by a space and the heading, in prose, code or a table cell:
#     `[实战框架 §4.2.3] 广义优势估计 (GAE)`. The text after it must START with the heading: the heading
#     exactly, or the heading and then anything (`人类反馈收集（评分、排序、比较、修正）`); a shortened heading
#     (`策略梯度` for 策略梯度算法) fails. When the citation ends its line, the text is the next line's
#     (a wrapped docstring), leading spaces and `#` dropped.
# Which text after a citation claims to be a heading: its first phrase (up to | ( ) , ; : . [ ] ` or
# their full-width forms, 、, two spaces, or the end of the line) that
#   - starts with, or contains, a Chinese character (`广义优势估计`, `Q-Learning算法`, `prompt 设计`), or
#   - is followed by Chinese punctuation (、，。；：（）《》: a Latin word in a Chinese sentence,
#     `self-attention、`), or
#   - starts with another section's heading of the same chapter (`[实战框架 §4.1.2] layer normalization`).
# Any other Latin text is English prose and is left alone (`[实战框架 §4.3.2] Bradley-Terry pairwise loss`,
# `[实战框架 §3.3.2] the rollout`); so is a citation followed by anything but a space (`]),`, `]:`).
# A citation of several sections may carry the heading of any of them. A Chinese sentence that goes on
# after a citation with a word that is not the heading puts punctuation first (`见 [强化对齐 §4.2.2]，其中…`).

CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
ZH_PUNCT = "、，。；：（）《》"
PHRASE_END = re.compile(r"[|()（）,，、;；:：.。\[\]【】`]|\s{2,}|$")
CELL = re.compile(r"(?<!\\)\|")                           # a table's cell boundary (not an escaped \|)


def _cells(line):
    return [c.strip() for c in CELL.split(line.strip())[1:-1]]


def heading_claims(text):
    """(line, tag, numbers, written, exact) for every heading written beside a citation in `text`, by the
    rules above: `written` is the table cell (exact: it must equal the heading) or the text after the
    citation (it must start with the heading)."""
    lines = text.split("\n")
    header = None
    for i, line in enumerate(lines):                      # the tables with a heading column
        if not line.lstrip().startswith("|"):
            header = None
            continue
        cells = _cells(line)
        if header is None:
            header = cells
            continue
        if len(header) > 1 and header[1].lower() in ("heading", "标题") and len(cells) > 1:
            m = CITATION.fullmatch(cells[0])
            if m:
                yield i + 1, m.group(1), re.findall(r"§([\d.]+)", m.group(2)), cells[1], True
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line) + 1)
    for m in CITATION.finditer(text):                     # a citation followed by a heading
        i = text[:m.start()].count("\n")
        after = text[m.end():starts[i + 1] - 1]
        if not after.strip() and i + 1 < len(lines):
            after = " " + lines[i + 1].lstrip(" \t#")     # the citation ends its line: the next line's text
        if not after.startswith(" "):
            continue
        written = after.lstrip(" ")
        end = PHRASE_END.search(written)
        phrase = written[:end.start()].strip()
        if not phrase:
            continue
        tag, numbers = m.group(1), [n.rstrip(".") for n in re.findall(r"§([\d.]+)", m.group(2))]
        followed_by = written[end.start():end.start() + 1]
        if (CJK.search(phrase) or (followed_by and followed_by in ZH_PUNCT)
                or any(phrase.startswith(h) for h in BOOK[tag]["sections"].values())):
            yield i + 1, tag, numbers, written, False


def heading_problems(text, where):
    """The headings in `text` that are not the chapter's: 'where:line: [TAG §n] written ..., the chapter ...'."""
    out, n = [], 0
    for line, tag, numbers, written, exact in heading_claims(text):
        headings = [BOOK[tag]["sections"][k] for k in numbers if k in BOOK[tag]["sections"]]
        if not headings:                                  # no such section: test_every_cited_section_... says so
            continue
        n += 1
        if not any(written == h if exact else written.startswith(h) for h in headings):
            shown = written if exact else written[:PHRASE_END.search(written).start()].strip() or written[:30]
            out.append(f"{where}:{line}: [{tag} §{'/§'.join(numbers)}] written {shown!r}, the chapter's heading "
                       f"is {' or '.join(map(repr, headings))}")
    return out, n


def test_every_heading_beside_a_citation_is_the_chapters():
    """The rules are in the comment above heading_claims."""
    problems, checked = [], 0
    for path in FILES:
        found, n = heading_problems(open(path, encoding="utf-8").read(), os.path.relpath(path, ROOT))
        problems += found
        checked += n
    assert checked > 80                                   # the README's map alone has more than 60
    assert not problems, "headings that are not the chapter's (data/book_sections.json):\n" + "\n".join(problems)


def test_the_heading_check_catches_a_wrong_heading():
    def wrong(text):
        return heading_problems(text, "made-up")[0]
    right = ["[实战框架 §4.2.3] 广义优势估计",
             "x = 1  # [实战框架 §4.2.3] 广义优势估计 (GAE)",
             "[流程与实践 §3.2] 人类反馈收集（评分、排序、比较、修正）",          # the heading, then more
             "[强化对齐 §4.2]\n    策略梯度定理与REINFORCE算法 and",            # wrapped onto the next line
             "[实战框架 §4.1.2] position encoding、[实战框架 §5.3.2] prompt 设计",
             "| section | heading | code |\n|---|---|---|\n| [实战框架 §4.2.1] | 重要性采样 | `ppo.py` |",
             "| section | code |\n|---|---|\n| [实战框架 §4.2.1] | `ppo.py` |",   # no heading column
             "[实战框架 §4.3.2] Bradley-Terry pairwise loss",                  # English prose
             "[实战框架 §3.3.2] the rollout",
             "[实战框架 §4.2.1-§4.2.2] 信赖域方法",                             # one of the sections cited
             "([实战框架 §4.2.2]): 随便什么",                                   # not a space after the citation
             "[实战框架 §4.2.3]\n\nP5 = 1"]
    for text in right:
        assert wrong(text) == [], text
    assert wrong("see [实战框架 §4.2.3] 重要性采样 here") == [
        "made-up:1: [实战框架 §4.2.3] written '重要性采样 here', the chapter's heading is '广义优势估计'"]
    bad = ["[实战框架 §4.2.3] 重要性采样",                                      # another section's heading
           "[流程与实践 §4.1] 策略梯度、[强化对齐 §4.2.3] 基线",                    # shortened, twice
           "[流程与实践 §3.3] 奖励塑形",                                   # a word of the section, not its heading
           "[流程与实践 §4.4] 示例 (the chat system)",                           # 示例:基于RLHF的对话系统
           "[实战框架 §4.1.1] self-attention、",                                # a Latin word in Chinese prose
           "[实战框架 §4.1.2] layer normalization",                             # §4.1.3's heading
           "[强化对齐 §4.1]\n  马尔可夫决策过程",                         # wrapped; §4.1 is 马尔可夫决策过程的数学表示
           "| section | heading |\n|---|---|\n| [实战框架 §4.2.2] | 信赖域 |",
           "| 书中小节 | 标题 |\n|---|---|\n| [实战框架 §4.2.2] | 信赖域方法（PPO） |"]   # a heading cell is exact
    for text in bad:
        assert wrong(text), text
    assert len(wrong(bad[1])) == 2
    assert [p.split(":")[1] for p in wrong("ok\n[实战框架 §4.2.2] 信赖域方法\n[实战框架 §4.2.2] 重要性采样")] == ["3"]


# ---- the Chinese guide (tests/README_zh.md): its map, its errata and the code it names --------------------------

ZH = open(os.path.join(ROOT, "tests", "README_zh.md"), encoding="utf-8").read()


def _section(text, heading):
    """The text of the `## heading...` section of `text`, up to the next `## `."""
    start = text.index("\n## " + heading)
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def _rows(text):
    """The data rows of every table in `text`, as lists of cells (header and separator rows left out)."""
    rows, header = [], None
    for line in text.split("\n"):
        if not line.lstrip().startswith("|"):
            header = None
            continue
        if header is None:
            header = line
            continue
        if not set(line.strip()) <= set("|-: "):
            rows.append(_cells(line))
    return rows


def test_the_chinese_map_has_all_five_chapters_and_the_rows_it_promises():
    """读书地图: one table per chapter, and the rows the map was asked for (each a row of its own, first cell the
    citation alone): reward shaping, evaluation, REINFORCE, the initial policy, data preparation, the policy and
    value nets against train_ppo.ActorCritic, and the MDP's definitions."""
    map_text = _section(ZH, "读书地图")
    for tag in TAGS:
        assert f"\n### {tag} — " in map_text, tag
    first_cells = {cells[0]: cells for cells in _rows(map_text)}
    promised = {"[流程与实践 §3.3]": "shape_rewards", "[流程与实践 §3.4]": "judge", "[强化对齐 §4.2.2]": "--ppo_epochs 1",
                "[实战框架 §3.3.1]": "setup", "[实战框架 §5.1]": "data/prepare.py", "[强化对齐 §5.1.2]": "ActorCritic",
                "[难点和问题 §4.1]": "ppo.py", "[强化对齐 §4.1.1]": "ppo.py", "[强化对齐 §4.1.2]": "per_token_rewards",
                "[强化对齐 §4.1.3]": "response_logprobs"}
    for citation, code in promised.items():
        assert citation in first_cells, f"读书地图 has no row of its own for {citation}"
        assert code in first_cells[citation][3], (citation, first_cells[citation][3])
    assert "C3" in first_cells["[流程与实践 §3.3]"][5]
    for tag in ("难点和问题", "从理论到实践"):
        assert sum(c.startswith(f"[{tag} §") for c in first_cells) >= 3, tag


def test_ppo_docstring_states_the_mdp_the_map_points_to():
    """The map sends [难点和问题 §4.1] and [强化对齐 §4.1.1]-§4.1.3 to ppo.py's docstring: it must state them."""
    import ast
    doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, "ppo.py"), encoding="utf-8").read()))
    for citation in ("[难点和问题 §4.1]", "[强化对齐 §4.1.1]", "[强化对齐 §4.1.2]", "[强化对齐 §4.1.3]"):
        assert citation in doc, citation
    assert "MDP" in doc and "deterministic" in doc


# every erratum the guide was asked to hold: its citation, and how many rows carry it at least
ERRATA = {"[实战框架 §4.2.1]": 1, "[实战框架 §4.2.3]": 1, "[实战框架 §5.2.1]": 1, "[实战框架 §5.2.2]": 1,
          "[实战框架 §5.2.3]": 2, "[实战框架 §5.3.3]": 1, "[实战框架 §5.4.1]": 2, "[实战框架 §7.3.3]": 1,
          "[流程与实践 §3.1]": 1, "[流程与实践 §3.3]": 1, "[流程与实践 §4.3]": 1, "[难点和问题 §1.1]": 1,
          "[难点和问题 §3.1]": 1, "[难点和问题 §4.1]": 1, "[难点和问题 §3.4]": 3, "[难点和问题 §4.3]": 1,
          "[难点和问题 §4.4]": 2, "[难点和问题 §4.5]": 2, "[难点和问题 §5.2]": 1, "[强化对齐 §5.1.3]": 2,
          "[强化对齐 §5.2.2]": 1, "[强化对齐 §5.3.1]": 1, "[从理论到实践 §4.1]": 1}


def test_the_chinese_errata_hold_every_erratum_and_name_real_tests():
    """勘误表: every erratum listed above is a row; a row's test cell names test functions that exist (in
    tests/test_errata.py unless another file is named), or says （文字）/（公式）: no code to test."""
    rows = [r for r in _rows(_section(ZH, "勘误表")) if len(r) == 5]
    for citation, n in ERRATA.items():
        assert sum(citation in r[0] for r in rows) >= n, f"勘误表: {citation} in fewer than {n} rows"
    tests = {f: open(os.path.join(ROOT, "tests", f), encoding="utf-8").read()
             for f in os.listdir(os.path.join(ROOT, "tests")) if f.startswith("test_") and f.endswith(".py")}
    for where, *_, test in rows:
        names = re.findall(r"`(test_\w+)`", test)
        if not names:
            assert test in ("（文字）", "（公式）") or re.search(r"`test_\w+\.py`", test), (where, test)
        for name in names:
            assert any(re.search(rf"^def {name}\(", src, re.M) for src in tests.values()), (where, name)
    assert len(rows) == int(re.search(r"书中 (\d+) 处错误", ZH).group(1))


MODULES = ("model", "ppo", "reward", "sample", "train_ppo", "train_rm", "train_sft", "chat",
           "data.prepare", "data.panel", "data.plumbing", "data.feedback", "data.classroom")


def _defines(src, name):
    return re.search(rf"^\s*(?:def|class)\s+{name}\b|^\s*{name}\s*[:=]|^[\w, ]*\b{name}\b[\w, ]*=|"
                     rf"^(?:from|import)\b.*\b{name}\b|self\.{name}\s*=", src, re.M)


def test_every_code_name_the_chinese_guide_cites_exists():
    """`file.py` `name`、`name` and `module.name` in README_zh.md and README.md's Chinese section: each name is
    defined in that file (an attribute `A.b`: A defined, b in the file). The flags it names are real flags,
    min_p excepted (exercise C5 adds it)."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    text = re.sub(r"```.*?```", "", ZH + readme[readme.index("## 给读这本书的同学"):readme.index("## Quick start")],
                  flags=re.S)
    cited = []
    for m in re.finditer(r"`((?:data/|tests/)?\w+\.py)`((?:[ 、，,]*`[^`\n]+`)+)", text):
        for token in re.findall(r"`([^`\n]+)`", m.group(2)):
            for part in re.split(r",\s*", token):
                if re.match(r"[A-Za-z_]\w*(\.\w+)?(\(.*\))?$", part) and not re.search(r"\.(py|pt|png|md)\b", part):
                    cited.append((m.group(1), part.split("(")[0]))
    book_code = _section(ZH, "勘误表")                      # quotes the book's own code: model.train(False) ...
    for m in re.finditer(r"`(" + "|".join(re.escape(x) for x in MODULES) + r")\.([A-Za-z_]\w*)",
                         text.replace(book_code, "")):
        if m.group(2) != "py":
            cited.append((m.group(1).replace(".", "/") + ".py", m.group(2)))
    assert len(cited) > 150
    missing = []
    for path, name in cited:
        src = open(os.path.join(ROOT, path), encoding="utf-8").read()
        head, _, attr = name.partition(".")
        if not _defines(src, head) or (attr and not re.search(rf"\b{attr}\b", src)):
            missing.append(f"{path} {name}")
    assert not missing, "the guide names code that does not exist: " + ", ".join(sorted(set(missing)))
    sources = "\n".join(open(p, encoding="utf-8").read() for p in FILES if p.endswith(".py"))
    flags = set(re.findall(r"--([a-z][a-z_]+)", text)) - {"help", "min_p"}
    unknown = [f for f in sorted(flags) if not re.search(rf"^\s+{f}\s*:", sources, re.M)
               and f"--{f}" not in sources.replace('"--' + f + " ", "")]
    assert not unknown, "flags the guide names that no script has: " + ", ".join(unknown)
