"""
Why the bag of words beats the reward model (README "Reward model"): the yardsticks behind that section, on the
labels a pipeline run left in out/ (sft.pt, panel_labels.jsonl, panel_labels_heldout.jsonl).

    python tests/rm_gap.py                             # the yardsticks: numpy, about a minute
    python tests/rm_gap.py --rm                        # + a reward model trained as train_rm.py trains it
    python tests/rm_gap.py --rm --rankings 3           # ... on 3 rankings of each prompt's replies
    python tests/rm_gap.py --rm --rankings 3 --separate   # ... each ranking its own item (3x the steps)
    python tests/rm_gap.py --rm --rankings 10 --epochs 2

Not a test (pytest collects only test_*.py) and not run by CI. Prints held-out gold accuracy on the panel's
held-out pairs for:
  - bag of words (train_rm.bag_of_words_baseline), and the same fit on other features: the reward model's own
    tokens (encode_reply ids, the 8,192-id tokenizer), those of lowercased text, GPT-2's full 50,257 ids;
  - the bag-of-words sum with the lexicon's mean ratings as the weights (what a perfect bag of words reaches:
    it misses only the context pairs);
  - with --rankings R: R - 1 more rankings of each training prompt's replies (a rater drawn at random for
    each), and the bag of words refitted on them;
  - with --rm: a reward model trained as train_rm.py's cpu preset trains it (optimizer groups, schedule,
    clipping), where every ranking adds its Plackett-Luce loss to one scoring of the replies (or, with
    --separate, where every ranking is an item of its own).
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_rm  # noqa: E402
from data.feedback import read_feedback  # noqa: E402
from data.prepare import words  # noqa: E402
from model import clip_and_step, lr_at  # noqa: E402
from data.prepare import encode_reply, get_tokenizer  # noqa: E402
from data.plumbing import load_checkpoint  # noqa: E402
from data.panel import Panel, gold_accuracy  # noqa: E402
from reward import RewardModel, plackett_luce_loss, reply_scores  # noqa: E402


def bag_of(features, train, heldout, panel):
    """train_rm.bag_of_words_baseline with `features(text) -> list of str` in place of words()."""
    saved = train_rm.words
    train_rm.words = features
    try:
        return train_rm.bag_of_words_baseline(train, heldout, panel)["gold_acc"]
    finally:
        train_rm.words = saved


def heldout_pairs(items):
    """Every ordered pair of every held-out ranking: ([(prompt, better reply)], [(prompt, worse reply)])."""
    better = [(r["prompt"], x) for r in items for a, x in enumerate(r["replies"]) for _ in r["replies"][a + 1:]]
    worse = [(r["prompt"], y) for r in items for a in range(len(r["replies"])) for y in r["replies"][a + 1:]]
    return better, worse


def yardsticks(train, heldout, panel):
    lexicon = {w for r in train for x in r["replies"] for w in words(x) if w in panel.index}
    for vocab in (8192, 50257):
        enc = get_tokenizer(vocab)
        multi = sum(len(enc.encode_ordinary(" " + w)) > 1 for w in lexicon)
        tokens = bag_of(lambda x: [str(t) for t in encode_reply(enc, x)], train, heldout, panel)
        lowered = bag_of(lambda x: [str(t) for t in encode_reply(enc, x.lower())], train, heldout, panel)
        print(f"{vocab:6d} ids: {multi} of the {len(lexicon)} lexicon words in the training replies take 2+ ids; "
              f"bag of tokens {tokens:.3f}, of lowercased text {lowered:.3f}")
    mean = panel.ratings.mean(1)                                              # (V,) the lexicon's mean rating
    form = lambda x: sum(mean[panel.index[w]] for w in set(words(x)) if w in panel.index)   # no context rule
    better, worse = ([x for _, x in pairs] for pairs in heldout_pairs(heldout))
    acc, n = gold_accuracy([form(x) for x in better], [form(x) for x in worse], panel.golds(better),
                           panel.golds(worse))
    print(f"the bag-of-words sum with the lexicon's mean ratings as weights: {acc:.3f} on {n} pairs")


def more_rankings(train, panel, rankings, seed):
    """Each record's replies ranked rankings - 1 more times, a rater drawn at random each time."""
    rng, out = np.random.default_rng(seed), []
    for r in train:
        orders = [list(range(len(r["replies"])))]
        orders += [panel.rank(r["replies"], rng)[0] for _ in range(rankings - 1)]
        out.append([{**r, "replies": [r["replies"][i] for i in o]} for o in orders])
    return out                                                 # per prompt: its rankings, the pipeline's first


def train_reward_model(args, groups, heldout, panel):
    """train_rm.py's recipe (cpu preset) on groups of rankings of the same replies; returns gold accuracy."""
    s = train_rm.Settings(**{**train_rm.PRESETS["cpu"], "epochs": args.epochs})
    items = [[r] for g in groups for r in g] if args.separate else groups
    sft = load_checkpoint(os.path.join(args.out_dir, "sft.pt"), made_by="train_sft.py", kind="sft")
    torch.manual_seed(s.seed)
    rm, enc = RewardModel.from_sft(sft, s.readout), get_tokenizer()
    optimizer = torch.optim.AdamW(train_rm.rm_param_groups(s, rm), lr=s.lr)
    batches = train_rm.batches_of(s, items)
    t0 = time.time()
    for step, batch in enumerate(batches):
        lr = lr_at(step, s.lr, s.min_lr, s.warmup_iters, len(batches))
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        first = [items[i][0] for i in batch]                     # the replies, in the first ranking's order
        flat = reply_scores(rm, enc, [p for r in first for p in r["prompts"]],
                            [x for r in first for x in r["replies"]])                  # (N,)
        losses, k = [], 0
        for i, r in zip(batch, first):
            scores = flat[k:k + len(r["replies"])]                               # (K,)
            k += len(r["replies"])
            orders = [[r["replies"].index(x) for x in other["replies"]] for other in items[i]]
            losses.append(plackett_luce_loss(scores[torch.tensor(orders)]))   # (R, K): this prompt's rankings
        torch.stack(losses).mean().backward()
        clip_and_step(optimizer, rm.parameters(), s.grad_clip)
    rm.eval()
    with torch.no_grad():
        better, worse = heldout_pairs(heldout)
        score = lambda pairs: torch.cat([reply_scores(rm, enc, [p for p, _ in pairs[i:i + 256]],
                                                      [x for _, x in pairs[i:i + 256]])
                                         for i in range(0, len(pairs), 256)])           # (N,)
        acc, _ = gold_accuracy(score(better), score(worse), panel.golds([x for _, x in better]),
                               panel.golds([x for _, x in worse]))
    print(f"  ({len(batches)} steps, {(time.time() - t0) / 60:.1f} min)")
    return acc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out_dir", default="out")
    ap.add_argument("--rm", action="store_true", help="also train a reward model (1.5 min per epoch on 2 cores)")
    ap.add_argument("--rankings", type=int, default=1, help="rankings per prompt (1: the labels as they are)")
    ap.add_argument("--separate", action="store_true", help="every ranking its own item (more steps)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=7, help="seeds the raters of the extra rankings")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    train, _ = read_feedback([os.path.join(args.out_dir, "panel_labels.jsonl")])
    heldout, _ = read_feedback([os.path.join(args.out_dir, "panel_labels_heldout.jsonl")])
    panel = Panel()
    print(f"{len(train)} training rankings, {len(heldout)} held-out; bag of words "
          f"{train_rm.bag_of_words_baseline(train, heldout, panel)['gold_acc']:.3f}")
    if args.rankings == 1 and not args.rm:
        yardsticks(train, heldout, panel)
    groups = more_rankings(train, panel, args.rankings, args.seed)
    bow = train_rm.bag_of_words_baseline([r for g in groups for r in g], heldout, panel)["gold_acc"]
    if args.rankings > 1:
        print(f"{args.rankings} rankings per prompt: bag of words {bow:.3f}")
    if not args.rm:
        return
    acc = train_reward_model(args, groups, heldout, panel)
    print(f"{args.rankings} ranking(s) per prompt{', separate items' if args.separate else ''}, {args.epochs} "
          f"epoch(s): reward model {acc:.3f}, bag of words {bow:.3f}")


if __name__ == "__main__":
    main()
