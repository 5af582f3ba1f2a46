"""Tests for sample.py ([实战框架 §5.4.1]): filters against hand-worked distributions, generation against generating
each prompt alone, EOT handling, truncation, and the command line. Tiny models, each test a few seconds."""
import os
import subprocess
import sys
from dataclasses import asdict, fields

import pytest
import torch

from model import GPT, GPTConfig
from data.prepare import EOT, get_tokenizer
from data.plumbing import parse_settings, save_checkpoint
from sample import Settings, decode_replies, encode_prompt, filter_logits, generate, load_model, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




def tiny(seed=0, block_size=64, dtype=torch.float32):
    """A random GPT with the real vocabulary (its <|endoftext|> id EOT must exist). Its embedding is scaled up so the
    logits are spread out and the argmax never hinges on a near-tie."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size))
    with torch.no_grad():
        m.wte.weight.mul_(10)
    return m.to(dtype).eval()


def kept(logits):
    """Indices of each row that may still be sampled."""
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in logits]


# ------------------------------------------------------------------------------------------ [实战框架 §5.4.1]

P5 = [0.5, 0.2, 0.15, 0.1, 0.05]                                              # cumulative: .5 .7 .85 .95 1


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([P5]).log()
    assert kept(filter_logits(logits, top_p=0.8)) == [{0, 1, 2}]              # .5+.2 = .7 < .8 <= .85
    assert kept(filter_logits(logits, top_p=0.6)) == [{0, 1}]
    assert kept(filter_logits(logits, top_p=0.9)) == [{0, 1, 2, 3}]
    assert kept(filter_logits(logits, top_p=0.01)) == [{0}]                   # the top token always stays
    assert kept(filter_logits(logits, top_p=1.0)) == [{0, 1, 2, 3, 4}]
    # rows are independent and the vocabulary order does not matter
    shuffled = torch.tensor([P5, [0.1, 0.5, 0.05, 0.2, 0.15]]).log()
    assert kept(filter_logits(shuffled, top_p=0.8)) == [{0, 1, 2}, {1, 3, 4}]
    out = filter_logits(shuffled, top_p=0.8)
    finite = torch.isfinite(out)
    assert torch.equal(out[finite], shuffled[finite])                         # survivors are untouched


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([P5, [0.1, 0.5, 0.05, 0.2, 0.15]]).log()
    assert kept(filter_logits(logits, top_k=2)) == [{0, 1}, {1, 3}]
    assert kept(filter_logits(logits, top_k=1)) == [{0}, {1}]
    assert kept(filter_logits(logits, top_k=50)) == [set(range(5))] * 2       # k > V keeps everything
    ties = torch.tensor([[1.0, 3.0, 1.0, 0.0]])
    assert kept(filter_logits(ties, top_k=2)) == [{0, 1, 2}]                  # documented: ties with k-th stay


def test_temperature_then_top_k_then_top_p():
    logits = torch.tensor([P5]).log()
    assert torch.allclose(filter_logits(logits, temperature=2.0), logits / 2)
    # top-p alone at 0.65 keeps {0, 1}; after top-k=2 the survivors renormalise to [5/7, 2/7] and
    # 5/7 = 0.714 >= 0.65 already, so only token 0 is left.
    assert kept(filter_logits(logits, top_p=0.65)) == [{0, 1}]
    assert kept(filter_logits(logits, top_k=2, top_p=0.65)) == [{0}]
    # temperature changes the distribution top-p sees: at T=2 the probs flatten to ~[.32 .20 .18 .14 .10]
    flat = torch.softmax(logits / 2, dim=-1)[0]
    assert flat[0] + flat[1] < 0.65 < flat[0] + flat[1] + flat[2]
    assert kept(filter_logits(logits, temperature=2.0, top_p=0.65)) == [{0, 1, 2}]


def test_filter_logits_rejects_bad_settings():
    logits = torch.zeros(1, 5)
    for bad in [dict(temperature=0.0), dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)]:
        with pytest.raises(ValueError):
            filter_logits(logits, **bad)


def test_sampling_follows_the_filtered_distribution():
    """Sampling many rows at once from [.5 .2 .15 .1 .05] with top_p=0.8: only {0, 1, 2}, in the
    renormalised proportions .5/.85, .2/.85, .15/.85."""
    logits = torch.tensor([P5]).log().expand(20000, 5)
    probs = torch.softmax(filter_logits(logits, top_p=0.8), dim=-1)
    draws = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(0)).flatten()
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert freq[3] == 0 and freq[4] == 0
    assert torch.allclose(freq[:3], torch.tensor([0.5, 0.2, 0.15]) / 0.85, atol=0.015)


# ---------------------------------------------------------------------------------------------------- generate

def test_temperature_to_zero_equals_greedy():
    m = tiny()
    prompts = [[464, 2068, 7586], [1549, 995, 13, 198, 3137]]
    greedy, _, gmask = generate(m, prompts, 12, greedy=True)
    cold, _, cmask = generate(m, prompts, 12, temperature=1e-6, generator=torch.Generator().manual_seed(3))
    zero, _, zmask = generate(m, prompts, 12, temperature=0.0, top_k=5, top_p=0.5)
    assert torch.equal(greedy, cold) and torch.equal(gmask, cmask)
    assert torch.equal(greedy, zero) and torch.equal(gmask, zmask)
    hot, _, _ = generate(m, prompts, 12, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(greedy, hot)                                       # sampling really samples


def test_same_seed_same_text_different_seed_different_text():
    m = tiny()
    prompts = [[464, 2068], [464, 2068]]
    run = lambda seed: generate(m, prompts, 12, top_k=100, top_p=0.95,
                                generator=torch.Generator().manual_seed(seed))[0]
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])                                        # rows draw independently


def test_batched_generation_equals_each_prompt_alone():
    """Left padding + KV cache are right iff a row in a batch decodes exactly as it does alone."""
    m = tiny(dtype=torch.float64)                                             # float64: no rounding ties
    prompts = [[464, 2068, 7586], list(range(1000, 1011)), [1549, 995, 13, 198, 3137, 12, 99]]
    seq, pad, mask = generate(m, prompts, 15, greedy=True)
    P = seq.size(1) - mask.size(1)
    assert P == 11 and pad.tolist() == [8, 0, 4]
    assert (seq[0, :8] == EOT).all()
    for i, p in enumerate(prompts):
        seq1, pad1, mask1 = generate(m, [p], 15, greedy=True)
        assert pad1.tolist() == [0] and seq1[0, :len(p)].tolist() == p == seq[i, pad[i]:P].tolist()
        assert seq[i, P:][mask[i]].tolist() == seq1[0, len(p):][mask1[0]].tolist()


def test_generation_matches_the_full_forward_pass():
    """The cached greedy decode picks, at every step, the argmax of a plain forward pass over the text so far."""
    m = tiny()
    seq, _, mask = generate(m, [[464, 2068, 7586, 2183]], 8, greedy=True)
    logits = m(seq)                                                           # (1, T, V), no cache, no padding
    assert torch.equal(logits[0, 3:-1].argmax(-1), seq[0, 4:])


def test_generation_under_bf16_autocast_uses_a_bf16_cache():
    """With --dtype bfloat16 rollouts run under autocast: the cache holds bf16 keys/values (half the bytes
    to read each decode step), and greedy decoding still follows the full forward pass under autocast."""
    m = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m.new_cache(2, 8).k.dtype == torch.bfloat16
        seq, _, mask = generate(m, [[464, 2068, 7586, 2183]], 8, greedy=True)
        logits = m(seq)                                                       # (1, T, V) bf16 logits
    assert m.new_cache(2, 8).k.dtype == torch.float32                         # outside autocast: the weights' dtype
    assert mask.all() and seq.shape == (1, 12)
    assert (logits[0, 3:-1].float().argmax(-1) == seq[0, 4:]).float().mean() >= 0.75   # bf16 near-ties may flip


def test_stops_at_eot_and_masks_after_it(monkeypatch):
    """Force row 0 to say EOT at step 2 and row 1 at step 4 (and EOT is forbidden otherwise)."""
    m = tiny()
    hidden_states, lm_head, calls = m.hidden_states, m.lm_head.forward, []

    def spy(idx, pad=None, cache=None):                                       # record what each pass is fed
        calls.append(tuple(idx.shape))
        return hidden_states(idx, pad, cache)

    def rigged(h):                                                            # h: (B, d) last position
        logits = lm_head(h).clone()                                           # (B, V)
        step = len(calls) - 1                                                 # pass 0 is the prefill -> step 0
        logits[:, EOT] = float("-inf")
        for row, at in [(0, 2), (1, 4)]:
            if step == at:
                logits[row, EOT] = 1e4
        return logits
    monkeypatch.setattr(m, "hidden_states", spy)
    monkeypatch.setattr(m.lm_head, "forward", rigged)
    seq, pad, mask = generate(m, [[464, 2068], [1549]], 10, temperature=1.0,
                              generator=torch.Generator().manual_seed(0))
    assert mask.tolist() == [[True, True, True, False, False], [True, True, True, True, True]]
    P = seq.size(1) - 5                                                       # stopped after 5 of 10 steps
    assert seq[0, P + 2:].tolist() == [EOT] * 3                               # EOT, then filled with EOT
    assert seq[1, P + 4].item() == EOT and EOT not in seq[1, P:P + 4].tolist()
    assert len(calls) == 5                                                    # no forward pass after the last step
    assert calls[0] == (2, 2) and all(shape == (2, 1) for shape in calls[1:])  # prefill, then 1 token per step
    enc = get_tokenizer()
    replies = decode_replies(enc, seq, mask)
    assert replies[0] == enc.decode(seq[0, P:P + 2].tolist()).strip()
    assert "<|endoftext|>" not in "".join(replies)


def test_on_token_streams_every_step():
    m = tiny()
    got = []
    seq, _, mask = generate(m, [[464], [2068, 7586]], 6, greedy=True, on_token=lambda s, t: got.append((s, t)))
    assert [s for s, _ in got] == list(range(mask.size(1)))
    assert torch.equal(torch.stack([t for _, t in got], dim=1), seq[:, seq.size(1) - mask.size(1):])


def test_long_prompt_is_truncated_from_the_left_with_a_warning():
    m = tiny(block_size=64)
    prompt = list(range(1000, 1100))                                          # 100 tokens, 64 - 10 = 54 fit
    with pytest.warns(UserWarning, match="truncated from the left"):
        seq, pad, mask = generate(m, [prompt, [5, 6]], 10, greedy=True)
    assert seq.size(1) - mask.size(1) == 54 and pad.tolist() == [0, 52]
    assert seq[0, :54].tolist() == prompt[-54:]
    ref, _, _ = generate(m, [prompt[-54:]], 10, greedy=True)
    assert torch.equal(seq[0], ref[0])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(m, [prompt], 64)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(m, [prompt], 0)


def test_empty_prompt():
    enc = get_tokenizer()
    ids = encode_prompt(enc, "")
    assert ids == enc.encode_ordinary("\n\nHuman: \n\nAssistant:")
    assert encode_prompt(enc, "Hi") == enc.encode_ordinary("\n\nHuman: Hi\n\nAssistant:")
    assert encode_prompt(enc, "Hi", chat=False) == enc.encode_ordinary("Hi")
    assert encode_prompt(enc, "", chat=False) == []
    m = tiny()
    seq, pad, mask = generate(m, [ids, []], 5, greedy=True)                   # [] starts from <|endoftext|>
    P = seq.size(1) - mask.size(1)
    assert P == len(ids) and pad.tolist() == [0, len(ids) - 1] and seq[1, P - 1].item() == EOT
    alone, _, alone_mask = generate(m, [[EOT]], 5, greedy=True)
    assert seq[1, P:][mask[1]].tolist() == alone[0, 1:][alone_mask[0]].tolist()


def test_generate_restores_training_mode_and_rejects_bad_input():
    m = tiny().train()
    generate(m, [[1, 2]], 2, greedy=True)
    assert m.training

    def stop(step, tokens):                                                   # e.g. Ctrl-C while chat.py streams
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        generate(m, [[1, 2]], 2, greedy=True, on_token=stop)
    assert m.training
    with pytest.raises(ValueError, match="token ids"):
        generate(m, [[1, 60000]], 2)
    with pytest.raises(ValueError):
        generate(m, [], 2)


def test_decode_replies_by_hand():
    enc = get_tokenizer()
    hello, fox = enc.encode_ordinary(" Good night"), enc.encode_ordinary(" The quick brown cat")
    seq = torch.tensor([[EOT, EOT, 11, 12] + hello + [EOT, EOT, EOT],
                        [21, 22, 23, 24] + fox + [71]])                       # (2, 4 + 5)
    resp_mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    assert decode_replies(enc, seq, resp_mask) == ["Good night", "The quick brown cat" + enc.decode([71])]


# ---------------------------------------------------------------------------------------------------- loading, CLI

def save_tiny(path, **extra):
    m = tiny()
    save_checkpoint({"model_args": asdict(m.config), "model": m.state_dict(), **extra}, str(path))
    return m


def test_load_model(tmp_path):
    m = save_tiny(tmp_path / "ppo.pt", kind="ppo", critic={"w": torch.zeros(2)})
    loaded, ckpt = load_model(str(tmp_path / "ppo.pt"))
    assert not loaded.training and ckpt["kind"] == "ppo"
    idx = torch.tensor([[464, 2068]])
    assert torch.equal(loaded(idx), m(idx))
    for name, script in [("sft.pt", "train_sft.py"), ("rm.pt", "train_rm.py"), ("ppo.pt", "train_ppo.py")]:
        with pytest.raises(FileNotFoundError, match=script):
            load_model(str(tmp_path / "missing" / name))
    with pytest.raises(FileNotFoundError, match="train_rm.py"):
        load_model(str(tmp_path / "other.pt"), made_by="train_rm.py")


def test_settings_flags(capsys):
    argv = ["--top-k", "5", "--top-p", "0.5", "--greedy", "--raw", "--prompt", "Hi there"]
    s = parse_settings(Settings, argv=argv)
    assert (s.top_k, s.top_p, s.greedy, s.raw, s.prompt) == (5, 0.5, True, True, "Hi there")
    assert parse_settings(Settings, argv=[]) == Settings()
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for f in fields(Settings):
        assert "--" + f.name.replace("_", "-") in out


def test_cli_prints_samples(tmp_path):
    save_tiny(tmp_path / "sft.pt")
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "sft.pt"), "--max-new-tokens", "5",
                        "--num-samples", "2", "--prompt", "Hello world"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "sample 1/2" in r.stdout and "sample 2/2" in r.stdout
    assert r.stdout.count("Human: Hello world\n\nAssistant:") == 2


def test_cli_missing_checkpoint(tmp_path, capsys):
    """In-process (no second interpreter start-up): a clean exit 1 with the message, no traceback."""
    assert main(["--ckpt", str(tmp_path / "sft.pt")]) == 1                 # `python sample.py` exits with it
    err = capsys.readouterr().err
    assert "train_sft.py" in err and "not found" in err


def test_sample_from_matches_distribution_and_never_draws_zero_probability():
    # inverse-CDF sampling: frequencies follow probs, and a zero-probability token is never drawn
    from sample import sample_from
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.0, 0.2]]).repeat(20000, 1)
    draws = sample_from(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert freq[1] == 0 and freq[3] == 0
    assert torch.allclose(freq, probs[0], atol=0.015)
