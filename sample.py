"""
Sample replies from a trained model ([实战框架 §5.4.1] 采样生成: temperature, top-k, top-p / nucleus; and greedy).

    python sample.py --ckpt out/sft.pt --prompt "Good morrow, sir. How dost thou?" --num-samples 3
    python sample.py --ckpt out/ppo.pt --prompt "To be, or not to be" --raw --greedy
    python sample.py --help                # every setting below is a --flag

train_ppo.py (rollouts) and chat.py (streaming) import the same functions:

    from sample import load_model, encode_prompt, generate, decode_replies
    enc, (model, ckpt) = get_tokenizer(), load_model("out/sft.pt")          # get_tokenizer from data.prepare
    seq, pad, resp_mask = generate(model, [encode_prompt(enc, "Hello")], max_new_tokens=64, top_p=0.95)
    replies = decode_replies(enc, seq, resp_mask)

Batched generation: left-pad the prompts with <|endoftext|> (`pad` (B,) counts the pad tokens: never attended
to, positions count from each row's first real token); one forward pass over the prompts fills the KV cache
(the "prefill"); then one token per step: filter the last logits, sample, feed the token back. A row that has
produced <|endoftext|> is done (it gets <|endoftext|>, resp_mask False); all done or max_new_tokens: stop.

What it simplifies: no beam search, no repetition penalty, no stop strings other than <|endoftext|>; a prompt
that does not fit is cut from the left (its oldest tokens go) with a warning.
"""
if __name__ == "__main__":    # Ctrl-C while the imports below load (a second or two): one line, status 130
    import os
    import signal
    signal.signal(signal.SIGINT, lambda *_: (os.write(2, b"\ninterrupted (Ctrl-C) while starting\n"),
                                             os._exit(130)))
import math
import os
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from model import gpt_from_checkpoint
from data.prepare import EOT, format_prompt, get_tokenizer
from data.plumbing import MADE_BY, flag, load_checkpoint, out_of_memory, parse_settings


@dataclass
class Sampling:
    """The decoding knobs ([实战框架 §5.4.1] 采样生成): sample.py's flags, chat.py's commands (/temp 0.7). To add a
    knob (e.g. min-p), all in this file: a field here (flag()); its rule in check_sampling and its step in
    filter_logits; an argument of generate, passed on to filter_logits; and its entry in sampling_args."""
    temperature: float = flag(0.8, ">= 0", "divides the logits: < 1 sharper, > 1 flatter, 0 (<1e-4): greedy")
    top_k: int = flag(50, ">= 0", "keep only the k most likely tokens (0 = off)")
    top_p: float = flag(0.95, "(0, 1]", "keep the smallest set of tokens with probability >= p (1.0 = off)")
    max_new_tokens: int = flag(64, ">= 1", "longest reply, in tokens (at most half the context window)")


@dataclass
class Settings(Sampling):
    ckpt: str = flag("out/sft.pt", "", "checkpoint to sample from: sft.pt, ppo.pt, or rm.pt (its GPT body)")
    prompt: str = flag("Good morrow, sir. How dost thou?", "",
                       "what the human says (or plain text with --raw)")
    num_samples: int = flag(3, ">= 1", "how many replies to draw for the prompt")
    greedy: bool = flag(False, "", "always take the most likely token (ignores the knobs above)")
    seed: int = flag(1337, ">= 0", "random seed: the same seed gives the same samples")
    raw: bool = flag(False, "", "use the prompt as plain text, not wrapped in Human/Assistant turns")
    device: str = flag("auto", "", "auto | cpu | cuda | cuda:N: where the model runs")


GREEDY_BELOW = 1e-4   # a temperature this small samples the argmax anyway (logits / 1e-40 overflow): greedy


def check_sampling(temperature=1.0, top_k=None, top_p=None):
    """The rules of the knobs, written once (None = off); ValueError names the knob."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k must be a whole number >= 1 (0 = off), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be a number in (0, 1] (1 = off), got {top_p!r}")


def sampling_args(s, block_size):
    """generate()'s keyword arguments from the knobs of `s` (a Sampling), checked; top_k 0 and top_p 1.0 are
    off, and a reply may take at most half the context window (the prompt needs room too)."""
    args = dict(temperature=s.temperature, top_k=s.top_k or None, top_p=s.top_p if s.top_p != 1.0 else None)
    check_sampling(**args)
    if not (isinstance(s.max_new_tokens, int) and 1 <= s.max_new_tokens <= block_size // 2):
        raise ValueError(f"max_new_tokens must be a whole number from 1 to {block_size // 2} (half the "
                         f"context window of {block_size} tokens), got {s.max_new_tokens!r}")
    return args


def load_model(path, device="cpu", made_by=None, kind=None):
    """(the GPT under ckpt["model"] in eval mode, ckpt) of any stage's checkpoint (or only `kind`'s)."""
    made_by = made_by or MADE_BY.get(os.path.basename(path), "train_sft.py")
    ckpt = load_checkpoint(path, made_by=made_by, kind=kind)
    return gpt_from_checkpoint(ckpt).to(device).eval(), ckpt


def encode_prompt(enc, text, chat=True):
    """Prompt tokens: `text` (or a list of turns) in chat format (format_prompt), or as it is (chat=False)."""
    return enc.encode_ordinary(format_prompt(text) if chat else text)


# ----------------------------------------------------------------------------------------------------
# [实战框架 §5.4.1] 采样生成, the decoding strategies ([实战框架 §3.4.1] 采样策略选择). Applied in this order:
# temperature, then top-k, then top-p on what is left. (Greedy decoding is the project's; the book samples.)

def filter_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) -> (B, V) with the tokens that may not be sampled set to -inf.
    temperature: logits / temperature (> 0 here; generate() treats 0 as greedy). top_k: keep the k largest
    logits (and any tied with the k-th). top_p (nucleus): keep the smallest set of most probable tokens whose
    total probability is >= top_p, the most probable always. None (or 1.0) keeps everything."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        raise ValueError("temperature 0 is greedy decoding: generate() takes the argmax, not filter_logits")
    logits = logits / temperature                                             # (B, V)
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]                # (B, 1) k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))              # (B, V)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)           # (B, V), (B, V)
        probs = F.softmax(sorted_logits, dim=-1)                              # (B, V) most probable first
        before = probs.cumsum(dim=-1) - probs                               # (B, V) mass of the tokens before
        drop_sorted = before >= top_p          # (B, V) set reached p; top token stays (before = 0 < top_p)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # (B, V) back in vocab order
        logits = logits.masked_fill(drop, float("-inf"))                      # (B, V)
    return logits


def sample_from(probs, generator=None):
    """One token per row of probs (B, V): a uniform u in [0, total) picks the first token whose cumulative
    probability exceeds u (torch.multinomial's distribution, ~15x faster on a CPU at V = 50257). A token of
    probability 0 is never drawn; (1 - 1e-6) keeps float rounding from landing on the end."""
    cdf = probs.cumsum(dim=-1)                                                # (B, V)
    u = torch.rand(probs.size(0), 1, generator=generator, device=probs.device)      # (B, 1) uniform in [0, 1)
    u = u * cdf[:, -1:] * (1 - 1e-6)                                          # (B, 1) in [0, total)
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=probs.size(-1) - 1)  # (B,)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, greedy=False,
             generator=None, on_token=None):
    """Sample a reply for every prompt (a list of token lists) in one batch. Returns (seq, pad, resp_mask):
      seq (B, P + R) long: left-padded prompts (pad = EOT), then R <= max_new_tokens generated tokens (only
          EOT after a row's first EOT); pad (B,) long: pad tokens at the start of each row;
      resp_mask (B, R) bool: True for generated tokens up to and including the first EOT.
    temperature 0 or greedy=True: the argmax. `generator`: a torch.Generator on the model's device;
    `on_token(step, tokens (B,))` is called after every step (streaming). An empty prompt starts from EOT."""
    block_size = model.config.block_size
    device = model.wte.weight.device
    if max_new_tokens < 1 or max_new_tokens >= block_size:
        raise ValueError(f"max_new_tokens must be in [1, block_size={block_size}), got {max_new_tokens}")
    if len(prompts) == 0:
        raise ValueError("generate() needs at least one prompt")
    check_sampling(temperature, top_k, top_p)
    greedy = greedy or temperature < GREEDY_BELOW
    idx, pad = left_padded(prompts, block_size - max_new_tokens, model.config.vocab_size, device)
    B, P = idx.shape                                                          # (B, P), (B,)
    was_training = model.training
    model.eval()                                                              # no dropout while sampling
    cache = model.new_cache(B, P + max_new_tokens)
    new_ids = idx                                           # (B, P) first the prefill: the whole prompt
    done = torch.zeros(B, dtype=torch.bool, device=device)                    # (B,) row has emitted EOT
    tokens, masks = [], []
    try:
        for step in range(max_new_tokens):
            h = model.hidden_states(new_ids, pad, cache)                      # (B, T, d), cache.pos += T
            logits = model.lm_head(h[:, -1, :])               # (B, V) the last position only: no (B, P, V)
            if greedy:
                nxt = logits.argmax(dim=-1)                                   # (B,)
            else:
                probs = F.softmax(filter_logits(logits.float(), temperature, top_k, top_p), dim=-1)  # (B, V)
                nxt = sample_from(probs, generator)                           # (B,)
            nxt = torch.where(done, torch.full_like(nxt, EOT), nxt)           # (B,) finished rows get EOT
            masks.append(~done)                                               # (B,) reply token (to 1st EOT)
            tokens.append(nxt)
            done = done | (nxt == EOT)
            if on_token is not None:
                on_token(step, nxt)
            if done.all():
                break
            new_ids = nxt[:, None]                                            # (B, 1) one new position
    finally:
        model.train(was_training)                                             # as the caller had it
    seq = torch.cat([idx, torch.stack(tokens, dim=1)], dim=1)                 # (B, P + R)
    return seq, pad, torch.stack(masks, dim=1)                                # resp_mask (B, R)


def left_padded(prompts, room, vocab_size, device):
    """idx (B, P): the prompts left-padded with EOT, pad (B,): the pad counts. An empty prompt becomes [EOT];
    one longer than `room` tokens loses its first ones (with a warning)."""
    prompts = [list(p) if len(p) > 0 else [EOT] for p in prompts]
    if max(len(p) for p in prompts) > room:
        warnings.warn(f"prompt longer than {room} tokens (block_size - max_new_tokens): truncated from the "
                      "left, its first tokens are dropped", stacklevel=3)
        prompts = [p[-room:] for p in prompts]
    idx = pad_sequence([torch.tensor(p, dtype=torch.long) for p in prompts], batch_first=True,
                       padding_value=EOT, padding_side="left")                # (B, P) left padding with EOT
    if idx.min() < 0 or idx.max() >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    pad = torch.tensor([idx.size(1) - len(p) for p in prompts], dtype=torch.long, device=device)  # (B,)
    return idx.to(device), pad


def decode_replies(enc, seq, resp_mask):
    """The reply text of each row: its tokens before the first EOT, less the leading space (encode_reply)."""
    R = resp_mask.size(1)
    resp = seq[:, seq.size(1) - R:]                                           # (B, R) generated tokens
    return [enc.decode([t for t, m in zip(row.tolist(), keep.tolist()) if m and t != EOT]).strip()
            for row, keep in zip(resp, resp_mask)]


def main(argv=None):
    s = parse_settings(Settings, argv=argv, doc=__doc__)                     # every field is a --flag
    device = ("cuda" if torch.cuda.is_available() else "cpu") if s.device == "auto" else s.device
    try:
        model, _ = load_model(s.ckpt, device=device)
        args = sampling_args(s, model.config.block_size)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    enc = get_tokenizer()
    torch.manual_seed(s.seed)
    generator = torch.Generator(device=device).manual_seed(s.seed)
    prompt = encode_prompt(enc, s.prompt, chat=not s.raw)
    try:
        seq, pad, resp_mask = generate(model, [prompt] * s.num_samples, s.max_new_tokens, **args,
                                       greedy=s.greedy, generator=generator)
    except (MemoryError, RuntimeError) as e:
        if out_of_memory(e) is None:
            raise
        print(f"error: {out_of_memory(e)}: fewer --num_samples at once", file=sys.stderr)
        return 1
    P = seq.size(1) - resp_mask.size(1)
    for i in range(s.num_samples):
        toks = [t for t, m in zip(seq[i, P:].tolist(), resp_mask[i].tolist()) if m]  # reply incl. its EOT
        cut = "" if toks and toks[-1] == EOT else " [... max_new_tokens reached]"
        print(f"---------- sample {i + 1}/{s.num_samples} ----------")
        print((enc.decode(prompt) + enc.decode([t for t in toks if t != EOT])).strip("\n") + cut)
    if s.num_samples > 1:
        print(summary(decode_replies(enc, seq, resp_mask)))
    return 0


def summary(replies):
    """What the knobs did to a batch of replies: how many differ, distinct words / all words, the real-word
    rate (the plays' own word list), words per reply."""
    from data.prepare import real_word_rate, words
    ws = [w for r in replies for w in words(r)]
    distinct = len(set(ws)) / max(len(ws), 1)
    return (f"{len(replies)} replies: {len(set(replies))} distinct; distinct words {distinct:.2f} of "
            f"{len(ws)}; real-word rate {real_word_rate(replies):.3f}; {len(ws) / len(replies):.1f} words "
            "each")


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)   # imports done: Ctrl-C is main's
    sys.exit(main())
