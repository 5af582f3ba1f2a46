"""
The plumbing every script shares, in one place a reader can skip: nothing here is RLHF.

    from data.plumbing import start_run, run_script, save_checkpoint, load_checkpoint

What is here, top to bottom:
  settings dataclass -> --flags, checked before any work   parse_settings, nested_settings, start_run
  one run per out_dir (a lock naming its holder)           lock_out_dir, unlock_out_dir
  torchrun: this process's rank, collectives               World, start_world, all_sum, gather_shards
  one line for an expected error, Ctrl-C, out of memory    run_script, out_of_memory
  files written atomically, each writer its own temp file  atomic_write, write_text, file_sha256
  checkpoints: one schema per kind, checked on every load  save_checkpoint, load_checkpoint,
                                                           LOAD_FIELDS, RESUME_FIELDS, checkpoint_problem
  figures (matplotlib, headless)                           pyplot, save_figure

It lives under data/ because the design card fixes the top-level files.
"""
import argparse
import contextlib
import errno
import glob
import hashlib
import io
import math
import os
import pathlib
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta

import torch
import torch.distributed as dist

try:
    import fcntl                        # file locks (POSIX); none on Windows
except ImportError:
    fcntl = None

from data.prepare import TOKENIZER_NAME, VOCAB_SIZE, prepare
from model import GPT, config_from_dict, with_positions


# ----------------------------------------------------------------------------------------------------
# Settings: every script keeps its settings in a dataclass at the top, one flag() per field (the default,
# the values it may take, its --help):  iters: int = flag(80, ">= 1", "PPO iterations")

def flag(default, allowed, help):
    """`allowed` is "" (any value; a float must be finite), a bound ">= 1" or "> 0" (finite), an interval
    "[0, 1)" or "(0, inf]" (an inf written inside it is allowed: "inf = off"), or choices "reply | all"."""
    return field(default=default, metadata={"allowed": allowed, "help": help})


def outside(value, allowed):
    """Why `value` is not among the `allowed` values of a flag (see flag()), or None if it is."""
    if "|" in allowed:
        choices = [c.strip() for c in allowed.split("|")]
        return None if value in choices else f"must be one of {', '.join(choices)}, not {value!r}"
    if isinstance(value, (str, bool)):
        return None
    if allowed.startswith(">"):
        op, lo = allowed.split()
        if not math.isfinite(value):
            return f"must be a finite number {allowed}, got {value}"
        ok = value >= float(lo) if op == ">=" else value > float(lo)
        return None if ok else f"must be {allowed}, got {value}"
    if allowed.startswith(("[", "(")):
        lo, hi = (float(x) for x in allowed[1:-1].split(","))
        above = value >= lo if allowed[0] == "[" else value > lo
        below = value <= hi if allowed[-1] == "]" else value < hi
        return None if above and below else f"must be in {allowed}, got {value}"
    return None if math.isfinite(value) else f"must be a finite number, got {value}"


def yes_or_no(text):
    """A bool flag's value: true/false, yes/no, on/off, 1/0; anything else is an error, not a silent False."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_settings(cls, presets=None, argv=None, doc=None, check=None):
    """A settings dataclass from the command line: every field is `--name value` (or `--name-with-dashes`),
    `--flag` alone sets a bool. The chosen preset of `presets` (name -> field values; "auto" = gpu if CUDA is
    available, else cpu) fills in the fields not given. Then, before any work, common_problems() and
    check(s) (the script's own rules, a list of problems): any problem is one argparse error line (exit 2)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)                 # --block_s is no --block_size
    for f in fields(cls):
        is_bool = f.type is bool
        by_preset = "".join(f"; {name} preset: {p[f.name]}" for name, p in (presets or {}).items()
                            if f.name in p)
        allowed = f"; allowed: {f.metadata['allowed']}" if f.metadata.get("allowed") else ""
        parser.add_argument(*sorted({f"--{f.name}", f"--{f.name.replace('_', '-')}"}), dest=f.name,
                            default=argparse.SUPPRESS, type=yes_or_no if is_bool else f.type,
                            help=f"{f.metadata.get('help', '')} (default: {f.default}{allowed}{by_preset})",
                            nargs="?" if is_bool else None, const=True if is_bool else None)  # --resume: true
    given = vars(parser.parse_args(argv))
    s = cls(**given)
    if presets is not None:
        preset = given.get("preset", cls.preset)
        if preset == "auto":
            preset = "gpu" if torch.cuda.is_available() and given.get("device", "auto") != "cpu" else "cpu"
        if preset not in presets:
            parser.error(f"unknown preset {preset!r}; choose from auto, {', '.join(presets)}")
        s = cls(**{**presets[preset], **given, "preset": preset})
    problems = common_problems(s) + (check(s) if check else [])
    if problems:
        parser.error("; ".join(problems))
    return s


def nested_settings(flag, module, args, out_dir, preset):
    """(settings, problems) of the flags one trainer passes to another it runs first (train_ppo.py's
    --sft_args "..." for train_sft.py), parsed and checked by that trainer's own parser before any work."""
    err = io.StringIO()
    try:
        argv = ["--out_dir", out_dir, "--preset", preset] + shlex.split(args)
        with contextlib.redirect_stderr(err):
            nested = parse_settings(module.Settings, module.PRESETS, argv, check=module.problems)
        if nested.out_dir != out_dir:                            # the outer run would not find what it writes
            return None, [f"{flag}: --out_dir is the outer run's own ({out_dir}); give it there"]
        return nested, []
    except (SystemExit, ValueError) as e:                                     # argparse's error line
        why = err.getvalue().strip().splitlines()[-1:] or [str(e)]
        return None, [f"{flag}: {why[0].split('error: ', 1)[-1]}"]


def common_problems(s):
    """Each field against its allowed values (flag()), --device, a writable --out_dir."""
    problems = [f"--{f.name} {why}" for f in fields(s)
                if (why := outside(getattr(s, f.name), f.metadata.get("allowed", "")))]
    device = getattr(s, "device", "auto")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        problems.append(f"--device must be auto, cpu or cuda, not {device!r}")
    elif device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {device}: no CUDA GPU is available here (torch.cuda.is_available() is "
                        "False); use --device cpu")
    if hasattr(s, "out_dir"):
        why = out_dir_problem(s.out_dir)
        if why:
            problems.append(f"--out_dir {why}")
        problems += [f"--out_dir {s.out_dir}: {name} is a folder, not the checkpoint file the run reads or "
                     "writes" for name in ("sft.pt", "rm.pt", "ppo.pt")
                     if os.path.isdir(os.path.join(s.out_dir, name))]
    return problems


def out_dir_problem(path):
    """Why `path` cannot be an out_dir (created if needed, a small file written and removed), or None."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path} is a file, not a folder"
    probe = os.path.join(path, f".write_probe.{os.getpid()}")                # one per process (torchrun)
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("probe")
        os.remove(probe)
    except OSError as e:
        return f"{path} is not writable ({e.strerror or e})"
    return None


def lock_out_dir(path):
    """One run per out_dir at a time: an exclusive lock on PATH/.lock, which names its holder. The kernel
    releases it when the process ends, however (kill -9 too): never stale. Nested runs of one process
    (train_ppo.py running train_sft.py first) share it. No fcntl (Windows): no lock."""
    key = os.path.realpath(path)
    if key not in _out_dir_locks and fcntl is not None:
        f = open(os.path.join(path, ".lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise OSError(f"--out_dir {path} is in use by {holder}: two runs in one folder would overwrite "
                          "each other's checkpoints; wait for it to end, or give another --out_dir") from None
        f.truncate(0)
        f.write(f"{os.path.basename(sys.argv[0]) or 'python'} (pid {os.getpid()}, since "
                f"{time.strftime('%H:%M:%S')})\n")
        f.flush()
        _out_dir_locks[key] = f
    _held_out_dirs.append(key)


def unlock_out_dir(everything=False):
    """End the innermost run's hold on its out_dir (everything=True: all of this process's holds)."""
    while _held_out_dirs:
        key = _held_out_dirs.pop()
        if key not in _held_out_dirs and key in _out_dir_locks:                 # its outermost run ended
            _out_dir_locks.pop(key).close()                                   # closing the file unlocks it
        if not everything:
            return


_out_dir_locks = {}    # realpath -> the open .lock file
_held_out_dirs = []    # the out_dirs of this process's runs, innermost last (a nested run's again)


# ----------------------------------------------------------------------------------------------------
# More than one process: `torchrun --standalone --nproc_per_node=N train_sft.py` starts N copies of a script,
# each with RANK, LOCAL_RANK and WORLD_SIZE in its environment; DDP averages the gradients of each backward
# pass across them. A plain `python train_sft.py` is a world of one: every helper below is then a no-op.

@dataclass
class World:
    rank: int = 0            # this process: 0 .. size - 1 (rank 0 logs, plots and writes checkpoints)
    size: int = 1            # processes in the run (torchrun's --nproc_per_node)
    local_rank: int = 0      # this process's number on its machine: the GPU it drives

    @property
    def main(self):
        return self.rank == 0

    def shard(self, items):
        """This process's share of a list: items rank, rank + size, rank + 2 size, ..."""
        return items[self.rank::self.size]

    def wrap(self, model):
        """model in DDP when there are several processes (gradients averaged in every backward pass, process
        0's weights copied to the others), else model. The only buffers (fixed positions) are not synced."""
        if self.size == 1:
            return model
        ids = [self.local_rank] if next(model.parameters()).is_cuda else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


def in_shares(fn, items):
    """fn(list) -> one result per item, run by each process on its share of items; every process gets all
    the results back in the list's order (gather_shards). A world of one: fn(items)."""
    rank, size = (int(os.environ["RANK"]), world_size()) if world_size() > 1 else (0, 1)
    return gather_shards(fn(items[rank::size]))


def start_run(cls, presets, argv, doc, check):
    """The first lines of every trainer: the checked settings, this process's World, the device; printed."""
    s = parse_settings(cls, presets, argv, doc=doc, check=check)
    w, device = start_world(s.device)
    if w.main:
        lock_out_dir(s.out_dir)                            # released by end_world(), or when the process ends
    print(f"preset: {s.preset} on {device}" + (f" x {w.size} processes" if w.size > 1 else "")
          + "  (override any setting with --name value; --help lists them)")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in asdict(s).items()))
    return s, w, device


def run_script(main):
    """Run main(): an expected error (a missing or bad file, bad data, a run that diverged) is one line
    `error: ...` and exit status 1, not a traceback; Ctrl-C is one line and status 130."""
    signal.signal(signal.SIGINT, signal.default_int_handler)          # imports done: Ctrl-C is main()'s
    try:
        main()
    except (OSError, ValueError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    except (MemoryError, RuntimeError) as e:                 # torch's CPU and CUDA allocators: RuntimeErrors
        if out_of_memory(e) is None:
            raise
        sys.exit(f"error: {out_of_memory(e)}: make the run smaller (--batch_size, --block_size, the model's "
                 "--n_layer / --n_embd, --max_new_tokens)")
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C): the checkpoints saved so far are whole; run again with --resume to "
              "continue from the last one", file=sys.stderr)
        sys.exit(130)


def out_of_memory(e):
    """The first line of an out-of-memory error (MemoryError, or torch's allocator on CPU or GPU), or None."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text:
        return f"out of memory ({text[:160]})"
    return None


def world_size():
    """Processes in this run, from torchrun's environment (1 for a plain `python script.py`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start_world(device_setting):
    """(World, device) for this process. Under torchrun: join the process group (nccl on CUDA, gloo on a CPU),
    drive GPU local_rank, silence print() but on rank 0, and turn a SIGTERM (torchrun stops the others when
    one process dies) into a clean exit."""
    global _world_users
    cuda = torch.cuda.is_available() and device_setting != "cpu"
    device = ("cuda" if cuda else "cpu") if device_setting == "auto" else device_setting
    if world_size() == 1:
        return World(), device
    w = World(int(os.environ["RANK"]), world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device.startswith("cuda"):
        device = f"cuda:{w.local_rank}"
        torch.cuda.set_device(device)
    _world_users += 1
    if dist.is_initialized():                    # train_ppo.py running train_sft.py first: one process group
        return w, device
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=w.rank, world_size=w.size,
                            timeout=timedelta(minutes=10))
    if w.main:                                   # the data cache: built once, by process 0, before any reads
        prepare(verbose=False)
    dist.barrier()
    if not w.main:
        sys.stdout = open(os.devnull, "w")                                    # one rank logs
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(
        f"error: process {w.rank} of {w.size} stopped: another process of the run ended (see its message "
        "above); every checkpoint on disk is whole"))
    return w, device


def all_sum(x):
    """x summed over the processes of a torchrun run (a new tensor); x itself in a plain run. A whole batch's
    statistics are sums of the processes' sums and counts: all collectives but DDP's come through here."""
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


def gather_shards(shard):
    """The inverse of World.shard: every process's results for its share of a list, back in the list's
    order, on every process (the list itself in a world of one)."""
    if world_size() == 1:
        return list(shard)
    parts = [None] * world_size()
    dist.all_gather_object(parts, list(shard))
    out = [None] * sum(map(len, parts))
    for r, part in enumerate(parts):
        out[r::len(parts)] = part                                         # rank r held items r, r + size, ...
    return out


def barrier():
    if world_size() > 1:
        dist.barrier()


def end_world():
    """The end of a run: release its out_dir, leave the process group (the last of nested start_worlds)."""
    global _world_users
    unlock_out_dir()
    if world_size() > 1:
        _world_users -= 1
        if _world_users == 0 and dist.is_initialized():
            dist.destroy_process_group()


_world_users = 0   # start_world calls not yet ended (train_ppo.py may run train_sft.py and train_rm.py first)


# ----------------------------------------------------------------------------------------------------
# Checkpoints: one dict per file, written atomically and loaded with weights_only=True (it cannot run code).

def atomic_write(path, write):
    """write(tmp) fills a temp file of this process's own (PATH.<pid>.<random>.tmp, same folder), then renamed
    over PATH: a reader sees the old file or the new one, never a half one, even after a kill -9. A temp file
    left by a process that no longer runs is removed by the next write."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    for old in glob.glob(os.path.join(glob.escape(folder), glob.escape(name) + ".*.tmp")):
        pid = old[len(os.path.join(folder, name)) + 1:].split(".")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(old)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())                          # on disk before the rename makes it PATH
        os.replace(tmp, path)
    except BaseException:                                 # Ctrl-C too: no temp file stays behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text(path, text):
    """Write a text file atomically (atomic_write)."""
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8", newline=""))


def file_sha256(path):
    """The sha256 of a file, in hex: which sft.pt and rm.pt a ppo.pt was trained from."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def pid_alive(pid):
    """Whether a process with this pid runs (a temp file's writer, atomic_write)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                               # alive, another user's
        return True
    return True


def save_checkpoint(obj, path):
    """Write the dict `obj` atomically, with the tokenizer its token ids belong to. A full disk or a folder
    that cannot be written is an OSError naming the path."""
    try:
        atomic_write(path, lambda tmp: torch.save({**obj, "tokenizer": TOKENIZER_NAME}, tmp))
    except (OSError, RuntimeError) as e:                  # torch.save reports a full disk as a RuntimeError
        folder = os.path.dirname(os.path.abspath(path))
        free = shutil.disk_usage(folder).free if os.path.isdir(folder) else None
        if getattr(e, "errno", None) == errno.ENOSPC or (free is not None and free < 64 * 2 ** 20):
            left = f" ({free / 2 ** 20:.0f} MiB free)" if free is not None else ""
            raise OSError(errno.ENOSPC, f"cannot write {path}: no space left on the device{left}; "
                                        f"{path} is unchanged") from None
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise OSError(getattr(e, "errno", None) or errno.EIO,
                      f"cannot write {path}: {reason}; {path} is unchanged") from None


MAX_WEIGHT = 1e3   # a trained model's weights stay far below this (here: below 10); beyond it a run diverged


def weights_problem(module):
    """None when every weight is finite and smaller than MAX_WEIGHT; else what is wrong with them. The
    trainers check this before every save, so a diverged run never replaces a checkpoint."""
    biggest = float(torch.stack([p.detach().abs().max() for p in module.parameters()]).max())   # nan if any is
    if not math.isfinite(biggest):
        return "not finite"
    if biggest > MAX_WEIGHT:
        return f"as large as {biggest:.3g} (a trained model's stay far below {MAX_WEIGHT:g})"
    return None


def last_good(path):
    """What a run that diverged says about the checkpoint it leaves behind (only finite ones are written)."""
    if not os.path.exists(path):
        return f"No checkpoint was written ({path} does not exist)."
    try:
        ckpt = load_checkpoint(path, made_by=MADE_BY.get(os.path.basename(path), "train_ppo.py"))
    except ValueError as e:
        return f"No good checkpoint is left: {e}."
    at = next((f" ({k} {ckpt[k]})" for k in ("step", "iter") if k in ckpt), "")
    return f"The last good checkpoint is {path}{at}, kept as it was."


MADE_BY = {"sft.pt": "train_sft.py", "rm.pt": "train_rm.py", "ppo.pt": "train_ppo.py"}   # who writes what
# What each kind of checkpoint holds beyond model_args and model, to be loaded and for --resume too. Each is
# checked on load (present, of its type): a file edited or cut short is one line naming the field.
NUMBER = (int, float)
LOAD_FIELDS = {"sft": {}, "ppo": {}, "rm": {"head": dict, "reward_mean": NUMBER, "reward_std": NUMBER}}
RESUME_FIELDS = {"sft": {"optimizer": dict, "rng": dict, "step": int, "best_val_loss": NUMBER,
                         "config": dict},
                 "rm": {"optimizer": dict, "step": int, "config": dict, "history": list},
                 "ppo": {"critic": dict, "optimizer": dict, "kl_coef": NUMBER, "iter": int, "history": list,
                         "config": dict, "rng": torch.Tensor}}


def load_checkpoint(path, made_by, map_location="cpu", kind=None, resume=False):
    """A checkpoint dict; `made_by`: the script that writes it (for the errors); `kind` ("sft", "rm", "ppo"):
    the kind expected, its LOAD_FIELDS (and RESUME_FIELDS) checked. A bad file is a ValueError naming it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found: run `python {made_by}` first to create it")
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path} is a folder, not a file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a broken file, or one that would need unpickling code: never load those
        raise ValueError(f"{path} is not a checkpoint this project wrote (it cannot be read as plain tensors "
                         f"and numbers: {type(e).__name__}); re-create it with `python {made_by}`") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_args"), dict) \
            or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path} is not a checkpoint this project wrote (no 'model_args'/'model' dicts); "
                         f"re-create it with `python {made_by}`")
    made_with = ckpt.get("tokenizer", f"gpt2-bpe-{ckpt['model_args'].get('vocab_size', '?')}")
    if made_with != TOKENIZER_NAME:  # its token ids would mean other words
        raise ValueError(f"{path} was made with another vocabulary ({made_with}); this code uses "
                         f"{TOKENIZER_NAME} (GPT-2's BPE cut to {VOCAB_SIZE:,} ids, see "
                         f"data.prepare.get_tokenizer): re-create it with `python {made_by}`")
    if kind is not None and ckpt.get("kind") != kind:
        raise ValueError(f"{path} is a {ckpt.get('kind', 'unknown')!s} checkpoint, not the {kind} checkpoint "
                         f"`python {made_by}` writes")
    needed = {**LOAD_FIELDS.get(kind, {}), **(RESUME_FIELDS[kind] if resume else {})}
    problem = checkpoint_problem(ckpt, needed)
    if problem:
        raise ValueError(f"{path} is damaged or was edited: {problem}; re-create it with `python {made_by}`")
    return ckpt


def checkpoint_problem(ckpt, needed):
    """None, or the first thing wrong with a checkpoint dict: a needed field missing or mistyped, a model_args
    that is no GPT's, weights whose names or shapes are not that GPT's, weights not finite."""
    for name, kind in needed.items():
        if name not in ckpt:
            return f"it has no {name!r}"
        if not isinstance(ckpt[name], kind) or isinstance(ckpt[name], bool):
            return f"its {name!r} is a {type(ckpt[name]).__name__}"
        if kind is NUMBER and not math.isfinite(ckpt[name]):
            return f"its {name!r} is {ckpt[name]}"
    if "reward_std" in needed and not ckpt["reward_std"] > 0:
        return f"its 'reward_std' is {ckpt['reward_std']} (a spread of scores is > 0)"
    try:
        cfg = config_from_dict(ckpt["model_args"])
        with torch.device("meta"):                                            # shapes only, no memory
            expected = {k: v.shape for k, v in GPT(cfg).state_dict().items()}
    except (TypeError, ValueError, RuntimeError) as e:
        return f"its {str(e).splitlines()[0]}".replace("its checkpoint config", "its model_args")
    weights = with_positions({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}, cfg)
    if set(weights) != set(expected):
        odd = sorted(set(weights) ^ set(expected))[0]
        return f"its 'model' weights are not those of its model_args (e.g. {odd!r})"
    for group, prefix in (("model", ""), ("critic", "body."), ("head", None)):
        for k, v in (weights if group == "model" else ckpt.get(group, {})).items():
            if not isinstance(v, torch.Tensor):
                return f"its {group} weight {k!r} is a {type(v).__name__}, not a tensor"
            shape = expected.get(k[len(prefix):]) if prefix is not None and k.startswith(prefix) else None
            if shape is not None and v.shape != shape:
                return f"its {group} weight {k!r} has shape {tuple(v.shape)}, not {tuple(shape)}"
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return f"its {group} weight {k!r} is not finite"
    return None


def pyplot():
    """matplotlib.pyplot, drawing into files only (no screen needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    """Save a matplotlib figure to `path` atomically and close it."""
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        pyplot().close(fig)
