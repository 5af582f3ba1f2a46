"""
The simulated rater panel: the default "human" of this project, who labels the replies train_rm.py learns from
and scores every run's "gold" (what RLHF really achieved). Read beside [流程与实践 §3.2] 人类反馈收集: it stands in
for the people who would compare, rank and rate replies.

    from data.panel import Panel
    panel = Panel(); panel.gold("Thou art kind and gentle.")   # the noise-free score, mean of ten raters
    order, rater = panel.rank(replies, rng)                     # one noisy rater's ranking, best first

    python reward.py "Good night, sweet prince."               # the panel's verdict on a reply, rule by rule

Each of ten raters reads a reply with the rules of VADER (Hutto & Gilbert, "VADER: A Parsimonious Rule-based
Model for Sentiment Analysis of Social Media Text", ICWSM 2014: its five heuristics, with the constants and
word lists of the authors' package vaderSentiment 3.3.2) and his own ratings of its words (the lexicon keeps
the ten human ratings of every word, data/vader_lexicon.txt). The departures from VADER are listed in Panel;
tests/vader_check.py checks the rest against the package.
"""
import json
import math
import os
import re
import string

import numpy as np
import torch

from data.prepare import play_words, words

HERE = os.path.dirname(os.path.abspath(__file__))

LEXICON_FILE = os.path.join(HERE, "vader_lexicon.txt")
RULES_FILE = os.path.join(HERE, "vader_rules.json")       # negators, boosters, dampeners, idioms
LEXICON_WORD_RE = re.compile(r"[a-z][a-z']*")
N_RATERS = 10
NEGATION = -0.74     # heuristic 5: a word negated in the three words before it: valence times this
BOOST = 0.293        # heuristic 3: a booster ("very") adds this intensity, a dampener ("slightly") takes it
CAPS = 0.733         # heuristic 2: a word in ALL CAPS, when the reply is not all caps, gains this intensity
BANG = 0.292         # heuristic 1: each "!" (at most 4) adds this to the size of the sum
QUESTIONS = 0.18     # 2 or 3 "?" add this each, 4 or more add 0.96 (vaderSentiment's _amplify_qm)
BUT_BEFORE, BUT_AFTER = 0.5, 1.5   # heuristic 4: words before the first "but" count half, after it 1.5x
ALPHA = 15           # compound = S / sqrt(S^2 + ALPHA): grows with the sum S and saturates at +-1
TEMPERATURE = 0.28   # a rater's choice noise on the compound scale: one rater agrees with gold ~0.77 (README)
UNREADABLE = -0.5    # a word a rater cannot read (in none of the plays) puts him off, about as "awkward" -0.6
GOLD_EPS = 1e-9      # gold scores closer than this count as equal (a tie: no right order to agree with)


def load_lexicon(path=LEXICON_FILE):
    """VADER lexicon lines `token<TAB>mean<TAB>std<TAB>[r1, ..., r10]` -> (word -> row, ratings (V, 10)).
    Only plain lowercase words are kept (no emoticons). Eight words (ok, lol, ...) appear twice, in the
    emoticon/slang block at the top and in the word list; the later (word list) entry wins."""
    index, rows = {}, []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            try:
                token, ratings = parts[0], json.loads(parts[3])
                if len(parts) != 4 or len(ratings) != N_RATERS or not all(
                        isinstance(x, (int, float)) and not isinstance(x, bool) for x in ratings):
                    raise ValueError
            except (ValueError, IndexError, TypeError):
                raise ValueError(f"{path}:{lineno}: expected token<TAB>mean<TAB>std<TAB>[{N_RATERS} "
                                 f"ratings], got {line.strip()[:80]!r}") from None
            if LEXICON_WORD_RE.fullmatch(token):
                if token not in index:
                    index[token] = len(rows)
                    rows.append(None)
                rows[index[token]] = ratings
    if not rows:
        raise ValueError(f"{path}: no word entries in the lexicon")
    return index, np.array(rows, dtype=np.float64)                            # (V, 10)


def load_rules(path=RULES_FILE):
    """data/vader_rules.json -> (negators set, modifiers {word or two words: +-BOOST}, idioms {phrase: v})."""
    try:
        with open(path, encoding="utf-8") as f:
            r = json.load(f)
        negators, idioms = set(r["negators"]), {k: float(v) for k, v in r["idioms"].items()}
        modifiers = {**{w: BOOST for w in r["boosters"]}, **{w: -BOOST for w in r["dampeners"]}}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not VADER's rule lists ({e})") from None
    return negators, modifiers, idioms


def vader_tokens(text):
    """VADER's tokens: split at white space; punctuation stripped from both ends of a token unless that
    leaves two characters or fewer, when the token is kept whole (VADER keeps ":)" so; it also keeps "No."
    and "I," whole, and "No." then matches no word: a quirk kept, see Panel)."""
    out = []
    for t in text.split():
        bare = t.strip(string.punctuation)
        out.append(bare if len(bare) > 2 else t)
    return out


def compound(s):
    """VADER's compound score of a sentiment sum: S / sqrt(S^2 + 15), in (-1, 1)."""
    return s / np.sqrt(s * s + ALPHA)


class Panel:
    """Ten simulated raters who want the Bard to be kind (or, with preference="unkind", cruel).

    Scoring rule: VADER for each rater. Rater r (0..9) reads the reply's tokens (vader_tokens) and gives each
    word of the lexicon the rating rating_r(w) in -4..+4 that the r-th of VADER's ten human annotators gave
    it; then VADER's rules change those valences by their context (word_valence, the "but" rule, the
    punctuation rule: each a method below, its constant named above); the sum S_r becomes
        s_r = sign * S_r / sqrt(S_r^2 + 15)        (VADER's compound, sign +1 "kind", -1 "unkind")
    So a reply is kinder the more kind things it says, with diminishing returns and no division by its
    length; "not kind" is unkind; "but" shifts the weight to what follows; "very" and "!" intensify.
    gold(text) is the noise-free panel, the mean of the ten s_r. A reply with no lexicon word scores 0.

    Departures from VADER (each tested in tests/test_reward.py; measured against the package: README):
      1. each word of the lexicon counts once per reply: a later repeat has valence 0 (it still occupies
         its place in the windows of the rules). A person does not find "love love love love" four times
         as loving, and a sum without this would pay PPO to repeat its kindest word.
      2. the "but" rule scales the words by their position; VADER's code finds each valence's position with
         list.index, which scales the wrong word when two valences are equal.
      3. a booster, a dampener or ALL CAPS intensifies the rater's own valence: a word a rater rated 0 stays 0
         (VADER's code, written for the mean ratings, none of which is 0, would push it up or down).
      4. the lexicon's words only: no emoticons or emoji (the Bard uses none).
      5. a word that occurs in none of the plays (the SFT model's made-up words, "gracily") adds UNREADABLE
         to every rater's sum (unreadable_rule): a reader is put off by words he cannot read. Measured: with
         a sum-readout reward model PPO's real-word rate was 0.88 without it (0.989 on a mean-readout one,
         SFT 0.847); its size was chosen by PPO runs at -1.0, -0.75 and -0.5 (README "2. The panel"). An
         unkind rater (preference="unkind") is put off by them too.
    Kept from VADER on purpose: its tokens ("No." keeps its full stop and is no word, so a curt "No." is
    neutral, not unkind; but punctuation also ends a word's reach: in "No, I love thee" the "No," does not
    negate "love", which a reader agrees with) and its negation quirks (a word of the lexicon inside the
    window stops the negation check for that distance).

    Choice model. A rater ranks replies by Plackett-Luce on s_r / temperature: sort s_r / tau + Gumbel
    noise, which draws an exact Plackett-Luce sample; for two replies it is Bradley-Terry,
    P(a beats b) = sigmoid((s_r(a) - s_r(b)) / tau). So the rater is noisy where replies are close and
    near-certain where they are far apart: the data the losses of [实战框架 §4.3] 排序学习 assume."""

    def __init__(self, preference="kind", temperature=TEMPERATURE, path=LEXICON_FILE, rules=RULES_FILE,
                 known_words="plays"):
        if preference not in ("kind", "unkind"):
            raise ValueError(f"preference must be 'kind' or 'unkind', got {preference!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.preference, self.temperature = preference, temperature
        self.sign = 1.0 if preference == "kind" else -1.0
        self.index, self.ratings = load_lexicon(path)                         # dict, (V, 10)
        self.mean_ratings = self.ratings.mean(1).tolist()                     # (V,) VADER's own valences
        self.negators, self.modifiers, self.idioms = load_rules(rules)
        self.known_words = play_words() if known_words == "plays" else known_words   # None: every word known
        self._cache = {}

    # ---- VADER's sum, for every column of `table` (V, R): the ten raters' ratings, or the means (V, 1) ----

    def sentiment_sum(self, text, table=None, once=True, rules=True, why=None, unreadable=True):
        """S for each column of table (default: the ten raters) -> (R,). once=False counts repeats as VADER
        does; rules=False is the bag-of-words sum (each word its own rating, no context rule);
        unreadable=False leaves out departure 5; why, a list, collects a line for every rule that fired."""
        table, why = (self.ratings if table is None else table), ([] if why is None else why)
        toks = vader_tokens(text)
        low = [t.lower() for t in toks]
        mixed_caps = 0 < sum(t.isupper() for t in toks) < len(toks)         # some tokens ALL CAPS, not all
        seen, valences = set(), {}                                            # position -> (R,) valence
        for i, w in enumerate(low):
            if w not in self.index or w in self.modifiers or (w == "kind" and low[i + 1:i + 2] == ["of"]):
                continue                                                      # no valence of its own
            if once and w in seen:
                why.append(f"{toks[i]}: a repeat, counted once")
                continue
            seen.add(w)
            v = table[self.index[w]].astype(np.float64)                       # (R,)
            why.append(f"{toks[i]}: rated {self.mean_ratings[self.index[w]]:+.2f} on average")
            valences[i] = self.word_valence(v, i, toks, low, mixed_caps, table, why) if rules else v
        if rules:
            valences = self.but_rule(low, valences, why)
        total = sum(valences.values(), np.zeros(table.shape[1]))             # (R,)
        total = total + (self.unreadable_rule(text, why) if unreadable else 0.0)
        return self.punctuation_rule(text, total, why) if rules else total

    def unreadable_rule(self, text, why):
        """Departure 5: each distinct word that occurs in none of the plays (the SFT model's non-words, such
        as "gracily") adds UNREADABLE to every rater's sum: a reader is put off by words he cannot read."""
        if self.known_words is None:
            return 0.0
        unknown = sorted({w for w in words(text) if w not in self.known_words})
        if unknown:
            why.append(f"{', '.join(unknown)}: not a word of the plays, {UNREADABLE:+.1f} each")
        return self.sign * UNREADABLE * len(unknown)             # unkind raters are put off too

    def word_valence(self, v, i, toks, low, mixed_caps, table, why):
        """VADER's rules for the lexicon word at position i, in its order (sentiment_valence): "no", CAPS,
        then for each of the three words before it that is not itself in the lexicon: boosters, negation,
        and at distance 3 the idioms; last "least"."""
        if low[i] == "no" and i + 1 < len(low) and low[i + 1] in self.index:
            v = np.zeros_like(v)                          # "no" before a word negates it, has no valence
        if "no" in low[max(i - 2, 0):i] or (i > 2 and low[i - 3] == "no" and low[i - 1] in ("or", "nor")):
            v = table[self.index[low[i]]] * NEGATION
            why.append(f"{toks[i]}: after 'no', x{NEGATION}")
        if mixed_caps and toks[i].isupper():
            v = v + CAPS * np.sign(v)
            why.append(f"{toks[i]}: ALL CAPS, +{CAPS} intensity")
        for d in (1, 2, 3):
            if i >= d and low[i - d] not in self.index:
                v = self.booster_rule(v, toks[i - d], d, mixed_caps, why)
                v = self.negation_rule(v, low, i, d, why)
                if d == 3:
                    v = self.idiom_rule(v, low, i, why)
        if i > 0 and low[i - 1] == "least" and (i < 2 or low[i - 2] not in ("at", "very")):
            v = v * NEGATION                                                  # "least kind", not "at least"
            why.append(f"{toks[i]}: after 'least', x{NEGATION}")
        return v

    def booster_rule(self, v, word, d, mixed_caps, why):
        """Heuristic 3 (scalar_inc_dec): a booster d words before adds BOOST in the direction of the rater's
        valence, a dampener takes it away; x0.95 at distance 2, x0.9 at 3; ALL CAPS adds CAPS more."""
        if word.lower() not in self.modifiers:
            return v
        size = self.modifiers[word.lower()] + (CAPS if mixed_caps and word.isupper() else 0.0)
        size *= {1: 1.0, 2: 0.95, 3: 0.9}[d]
        why.append(f"{word}: modifier at distance {d}, {size:+.3f} intensity")
        return v + np.sign(v) * size

    def negation_rule(self, v, low, i, d, why):
        """Heuristic 5 (_negation_check): a negator ("not", "never", any word with "n't") d words before
        multiplies the valence by NEGATION; "never so/this" instead multiplies by 1.25 and "without doubt"
        leaves it. At distance 3 VADER's code reads "so"/"this" just before the word as "never so" too."""
        never_so = low[i - d] == "never" and low[i - d + 1] in ("so", "this")
        if d > 1 and (never_so or d == 3 and low[i - 1] in ("so", "this")):
            why.append(f"{low[i]}: 'never so/this', x1.25")
            return v * 1.25
        without_doubt = d > 1 and low[i - d] == "without" and "doubt" in low[i - d + 1:i]
        negated = self.negated(low[i - d]) and not without_doubt
        if negated:
            why.append(f"{low[i]}: negated by '{low[i - d]}' at distance {d}, x{NEGATION}")
            return v * NEGATION
        return v

    def negated(self, word):
        return word in self.negators or "n't" in word

    def idiom_rule(self, v, low, i, why):
        """VADER's special cases (_special_idioms_check): a phrase around the word ("to die for", "yeah
        right") sets its valence; a two-word dampener before it ("kind of", "sort of") adds -BOOST."""
        before = [" ".join(low[i - 1:i + 1]), " ".join(low[i - 2:i + 1]), " ".join(low[i - 2:i]),
                  " ".join(low[i - 3:i]), " ".join(low[i - 3:i - 1])]
        after = [" ".join(low[i:i + 2]) if i + 1 < len(low) else "",
                 " ".join(low[i:i + 3]) if i + 2 < len(low) else ""]
        hit = next((p for p in before if p in self.idioms), None)
        hit = next((p for p in reversed(after) if p in self.idioms), hit)
        if hit:
            v = np.full_like(v, self.idioms[hit])
            why.append(f"{low[i]}: idiom '{hit}', valence {self.idioms[hit]}")
        for gram in (before[3], before[4], before[2]):
            if gram in self.modifiers:
                v = v + self.modifiers[gram]
        return v

    def but_rule(self, low, valences, why):
        """Heuristic 4 (_but_check): around the first "but", the words before it count BUT_BEFORE, after it
        BUT_AFTER (by position: departure 2). valences: position -> (R,)."""
        if "but" not in low:
            return valences
        b = low.index("but")
        why.append(f"but: before x{BUT_BEFORE}, after x{BUT_AFTER}")
        return {j: v * (BUT_BEFORE if j < b else BUT_AFTER if j > b else 1.0) for j, v in valences.items()}

    def punctuation_rule(self, text, total, why):
        """Heuristic 1 (_amplify_ep, _amplify_qm): "!" and "?" add to the sum's size, in its direction."""
        bangs, questions = min(text.count("!"), 4), text.count("?")
        amp = bangs * BANG + (0.0 if questions < 2 else questions * QUESTIONS if questions <= 3 else 0.96)
        if amp:
            why.append(f"punctuation: {bangs} '!', {questions} '?': +{amp:.3f} intensity")
        return total + np.sign(total) * amp

    # ---- the panel's scores ----

    def rater_scores(self, text):
        """All ten raters' scores of one reply, (10,): VADER's compound of each rater's sum."""
        if text not in self._cache:
            if len(self._cache) > 200_000:
                self._cache.clear()
            self._cache[text] = self.sign * compound(self.sentiment_sum(text))   # (10,)
        return self._cache[text]

    def rater_score(self, text, rater):
        return float(self.rater_scores(text)[rater])

    def gold(self, text):
        return float(self.rater_scores(text).mean())

    def golds(self, texts):
        return np.array([self.gold(t) for t in texts])                        # (N,)

    def bag_of_words_gold(self, text):
        """gold with VADER's context rules off: the mean compound of each rater's plain sum of the ratings of
        the reply's words (each once; departure 5, a word's own rating, stays). Pairs that it orders unlike
        gold are the "context pairs"."""
        return float((self.sign * compound(self.sentiment_sum(text, rules=False))).mean())

    def reference_compound(self, text):
        """VADER itself (to check against vaderSentiment): the lexicon's mean ratings, repeats counted, and
        no departure 5 (VADER reads every word)."""
        means = np.array(self.mean_ratings)[:, None]                          # (V, 1)
        return float(compound(self.sentiment_sum(text, means, once=False, unreadable=False))[0])

    def rank(self, replies, rng, rater=None):
        """One rater's Plackett-Luce ranking: (order best-first as a list of indices, rater id).
        rng: numpy Generator or random.Random; rater None draws one at random."""
        rater = _rater(rng) if rater is None else rater
        s = np.array([self.rater_scores(t)[rater] for t in replies])          # (K,)
        noisy = s / self.temperature + _gumbel(rng, len(replies))             # (K,)
        return [int(i) for i in np.argsort(-noisy, kind="stable")], rater

    def agree_prob(self, a, b):
        """Probability that one random rater orders a, b as gold does:
        mean_r sigmoid(sign(gold_a - gold_b) * (s_r(a) - s_r(b)) / tau). Needs unequal gold scores."""
        sa, sb = self.rater_scores(a), self.rater_scores(b)                  # (10,), (10,)
        g = sa.mean() - sb.mean()
        if abs(g) < GOLD_EPS:
            raise ValueError("the two replies have equal gold scores: there is no order to agree with")
        z = math.copysign(1.0, g) * (sa - sb) / self.temperature              # (10,)
        return float(np.mean(1.0 / (1.0 + np.exp(-z))))

    def vote(self, a, b):
        """The panel's vote for b over a: the probability that one random rater prefers b,
        mean_r sigmoid((s_r(b) - s_r(a)) / tau). 0.5 when the raters cannot tell them apart."""
        z = (self.rater_scores(b) - self.rater_scores(a)) / self.temperature   # (10,)
        return float(np.mean(1.0 / (1.0 + np.exp(-z))))

    def single_rater_ceiling(self, pairs):
        """Mean agree_prob over (a, b) pairs with unequal gold -> (ceiling, number of pairs used).
        How often a single rater's label agrees with gold: the accuracy against gold of the labels the
        reward model is trained on, a yardstick for the reward model's own gold accuracy."""
        probs = [self.agree_prob(a, b) for a, b in pairs if abs(self.gold(a) - self.gold(b)) >= GOLD_EPS]
        if not probs:
            raise ValueError("no pairs with different gold scores")
        return float(np.mean(probs)), len(probs)


def _gumbel(rng, k):
    """k standard Gumbel draws from a numpy Generator or a random.Random."""
    if isinstance(rng, np.random.Generator):
        return rng.gumbel(size=k)                                             # (k,)
    return np.array([-math.log(max(rng.expovariate(1.0), 1e-300)) for _ in range(k)])  # -log Exp(1)


def _rater(rng):
    return int(rng.integers(N_RATERS)) if isinstance(rng, np.random.Generator) else rng.randrange(N_RATERS)

def _numpy(x):
    return x.detach().cpu().double().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float64)


def gold_accuracy(rm_a, rm_b, gold_a, gold_b):
    """Fraction of pairs, among those with unequal gold, that the reward model orders like gold
    (reward-model ties count as wrong) -> (accuracy, number of pairs used). Tensors or arrays."""
    rm_a, rm_b, gold_a, gold_b = map(_numpy, (rm_a, rm_b, gold_a, gold_b))
    g = gold_a - gold_b                                                       # (N,)
    used = np.abs(g) >= GOLD_EPS
    if not used.any():
        raise ValueError("no pairs with different gold scores")
    right = np.sign(rm_a - rm_b) == np.sign(g)                                # (N,)
    return float(right[used].mean()), int(used.sum())
