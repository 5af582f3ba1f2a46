"""
The panel against the reference implementation: with the lexicon's mean ratings in place of one rater's
and repeats counted, data.panel.Panel.reference_compound must give the compound score of the authors' package
vaderSentiment 3.3.2. A one-off measurement (README "The panel"), never a dependency:

    pip install --no-deps --target /tmp/vader vaderSentiment==3.3.2
    python tests/vader_check.py --vader /tmp/vader             # every reply of the plays
    python tests/vader_check.py --vader /tmp/vader --show 20   # and the first 20 that differ

Not a test (pytest collects only test_*.py) and not run by CI. Prints how many replies agree to 1e-4, and
for the others the cause: a "but" with two equal valences (departure 2 of the Panel docstring), an emoticon
or slang token that the panel's lexicon does not keep (departure 4), or anything else (a bug to report).
Also: how often VADER's rules change the order of two random replies relative to the bag-of-words sum, and
how many replies hold a negator.
"""
import argparse
import contextlib
import os
import sys
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.prepare import SPLITS, load_turns  # noqa: E402
import data.panel as panel_module  # noqa: E402
from data.panel import Panel, vader_tokens  # noqa: E402


@contextlib.contextmanager
def vaders_but(panel):
    """The panel with VADER's own "but" code: each valence's position found by list.index (the first equal
    value), the list changed while it is walked."""
    def but_rule(low, valences, why):
        if "but" not in low:
            return valences
        b = low.index("but")
        full = [float(valences[j][0]) if j in valences else 0.0 for j in range(len(low))]   # VADER's list
        for v in list(full):
            j = full.index(v)
            full[j] = v * 0.5 if j < b else v * 1.5 if j > b else v
        return {j: np.array([v]) for j, v in enumerate(full)}
    panel.but_rule = but_rule
    yield
    del panel.but_rule


@contextlib.contextmanager
def vaders_zero_sign(panel):
    """The panel with VADER's signs for boosters and CAPS: a valence of 0 is intensified as a positive one."""
    panel_module.np = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    panel_module.np.sign = lambda v: np.where(np.asarray(v) < 0, -1.0, 1.0)
    yield
    panel_module.np = np


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vader", required=True, help="folder holding the vaderSentiment package (pip --target)")
    ap.add_argument("--show", type=int, default=0, help="print this many differing replies")
    args = ap.parse_args()
    sys.path.insert(0, args.vader)
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    ref, panel = SentimentIntensityAnalyzer(), Panel()
    replies = sorted({t["reply"] for split in SPLITS for t in load_turns(split)})
    causes, shown = {"agree": 0, "departure 2 (but)": 0, "departure 3 (a 0 valence intensified)": 0,
                     "departure 4 (emoticon or slang)": 0, "other": 0}, 0
    for text in replies:
        a, b = ref.polarity_scores(text)["compound"], panel.reference_compound(text)
        if abs(a - b) < 1e-4:           # the package rounds to 4 digits
            causes["agree"] += 1
            continue
        cause = "other"
        for name, variant in (("departure 2 (but)", vaders_but), ("departure 3 (a 0 valence intensified)",
                                                                  vaders_zero_sign)):
            with variant(panel):
                if abs(a - panel.reference_compound(text)) < 1e-4:
                    cause = name
        if any(t in ref.lexicon and t not in panel.index for t in (x.lower() for x in vader_tokens(text))):
            cause = "departure 4 (emoticon or slang)"
        causes[cause] += 1
        if shown < args.show:
            shown += 1
            print(f"{a:+.4f} (vaderSentiment) vs {b:+.4f} (panel) [{cause}]: {text[:120]!r}")
    n = len(replies)
    print(f"{n} distinct replies of the plays; to 1e-4: " + ", ".join(f"{k} {v} ({v / n:.2%})"
                                                                      for k, v in causes.items()))
    rng = np.random.default_rng(0)
    sample = [replies[i] for i in rng.choice(n, 4000, replace=False)]
    gold, bow = panel.golds(sample), np.array([panel.bag_of_words_gold(t) for t in sample])
    i, j = rng.integers(4000, size=(2, 20000))
    keep = np.abs(gold[i] - gold[j]) > 1e-9
    flipped = np.sign(gold[i] - gold[j]) != np.sign(bow[i] - bow[j])
    negators = np.mean([any(panel.negated(t.lower()) for t in vader_tokens(x)) for x in sample])
    print(f"4,000 random replies: the rules change the order of {flipped[keep].mean():.1%} of random pairs "
          f"(gold vs the bag-of-words sum, {keep.sum()} pairs with unequal gold); {negators:.0%} hold a negator")


if __name__ == "__main__":
    main()
