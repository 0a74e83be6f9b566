"""Files the commands leave whole: atomic writes, one run per output folder, clean stops, safe reads.

Every command of this project writes something a later run relies on (checkpoints, caches, eval.json,
heat maps). Four rules keep those files whole, whatever happens to the process:
- atomic writes: a file is written to a temporary name beside it, flushed to disk, and only then
  renamed over the old one, so a crash, a kill or a full disk leaves the previous file as it was;
  a full disk ends the command with one line naming the file and the cause;
- a lock per output folder (or cache): a second run into the same place refuses at once and names
  the first; a lock whose process no longer exists (a crashed run) is recognised and taken over;
- SIGTERM (a scheduler's stop) is turned into KeyboardInterrupt, so the same clean-up as Ctrl-C runs;
- checkpoints are read with torch.load(weights_only=True): nothing in the file is executed, and every
  way a file can fail to be a checkpoint becomes one message that names it.

    python -c "import prepare.files"   # a library used by train.py, eval.py and prepare/
"""
import errno
import json
import os
import pickle
import signal
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import torch

from model import ModelConfig

REASONS = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "file too large",
           errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
           errno.EACCES: "permission denied"}


class WriteError(ValueError):
    """A file could not be written; the message names it and says why. The old file is untouched."""


def atomic_write(path, write) -> Path:
    """Write `path` through a temporary file beside it: write(f) fills the open binary file, which
    is flushed and fsynced before os.replace puts it in place. An OSError (full disk, file size
    limit) removes the temporary file and raises WriteError naming `path` and the cause."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        tmp.unlink(missing_ok=True)
        cause = next((c for c in (e, e.__context__, e.__cause__) if isinstance(c, OSError)), None)
        if cause is None and not isinstance(e, OSError) and "write" not in str(e).lower():
            raise
        reason = REASONS.get(getattr(cause, "errno", None), getattr(cause, "strerror", None) or str(e))
        raise WriteError(f"{path}: could not be written ({reason}); any earlier version of the "
                         f"file is unchanged") from None
    return path


def write_text(path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def save_torch(obj, path) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


# ----------------------------------------------------------------------------- one run per folder

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:  # removed meanwhile: the next try creates it
        return 0.0


@contextmanager
def run_lock(lock, what: str):
    """Hold the lock file `lock` (e.g. OUT_DIR/.lock, CACHE.jsonl.lock) while the block runs: a
    second holder refuses at once with a message naming the first (its pid, host, start and
    command). A lock is stale when it was written on this host by a process that no longer exists
    (a crashed or killed run), or when it is still empty or unreadable a minute after it was made (a
    run killed between creating and writing it): it is taken over, with a note. A lock from another
    host is never taken over (its process cannot be checked from here)."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%d %H:%M:%S"),
              command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:])[:200])
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                other = json.loads(lock.read_text(encoding="utf-8"))
            except (OSError, ValueError):  # being written this instant, or its writer was killed
                other = {}
            other = other if isinstance(other, dict) else {}
            dead = other.get("host") == me["host"] and isinstance(other.get("pid"), int) \
                and not _alive(other["pid"])
            if dead or (not other and _age(lock) > 60):
                why = f"its run (pid {other['pid']}, started {other.get('started')}) no longer exists" \
                    if dead else "it was left empty or torn over a minute ago"
                print(f"{what}: taking over {lock}: {why}", file=sys.stderr)
                lock.unlink(missing_ok=True)
                continue
            raise ValueError(f"{lock.parent} is in use by another {what} run (pid {other.get('pid', '?')} "
                             f"on {other.get('host', '?')}, started {other.get('started', '?')}: "
                             f"{other.get('command', '?')}); wait for it to finish or pick another "
                             f"output. If no such run exists, delete {lock}") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        break
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be."""


@contextmanager
def sigterm_as_interrupt():
    """Inside the block SIGTERM raises Terminated (a KeyboardInterrupt), so a scheduler's stop runs
    the same clean-up as Ctrl-C (only in the main thread, where signal handlers can be set)."""
    def handler(signum, frame):
        raise Terminated(f"signal {signum}")

    with _handlers(handler, signal.SIGTERM):
        yield


def worker_signals():
    """Pool initializer: Ctrl-C is the parent's to handle, and SIGTERM (a scheduler's stop, or the
    pool's own shutdown) ends a worker at once instead of raising in it as in the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def exit_code(interrupt: BaseException) -> int:
    """The shell's 128 + signal of an interrupted command: 143 after SIGTERM, 130 after Ctrl-C."""
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


class StopRequest:
    signum = None  # the signal that asked for a stop, once one did


@contextmanager
def stop_requests():
    """Inside the block Ctrl-C (SIGINT) and SIGTERM ask for a stop instead of interrupting: a loop
    checks `.signum` between steps and ends at a whole one; a second signal interrupts at once."""
    request = StopRequest()

    def handler(signum, frame):
        if request.signum is not None:
            raise KeyboardInterrupt(f"signal {signum}")
        request.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step (again to stop at once)",
              file=sys.stderr, flush=True)

    with _handlers(handler, signal.SIGINT, signal.SIGTERM):
        yield request


class Stopped(Exception):
    """A run ended early by a signal, its state saved; exit_code is the shell's 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


@contextmanager
def _handlers(handler, *signums):
    try:
        old = {s: signal.signal(s, handler) for s in signums}
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- checkpoints

def read_checkpoint(path, resume_with: ModelConfig = None) -> dict:
    """A checkpoint file -> its dict, loaded with weights_only (nothing in it is executed).

    Every way a file can fail to be a BrgSA checkpoint (missing, truncated, corrupt, pickled objects
    that are not plain data, config fields this code does not know) becomes one ValueError or
    FileNotFoundError naming the file; torch's own message is kept out because it advises
    weights_only=False, which would execute an untrusted file. resume_with: the model config of a
    run that wants to continue this one: the checkpoint must hold the training state and match it."""
    if resume_with is not None:
        return _resumable(Path(path), resume_with)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "unsupported global" in str(e).lower():  # torch's refusal of a pickled class
            raise ValueError(f"{path}: holds objects other than tensors and plain data, so it was "
                             f"not loaded (not a checkpoint written by train.py)") from None
        raise ValueError(f"{path}: corrupt or truncated checkpoint, cannot be read") from None
    except Exception as e:  # truncated zip, bad magic number, EOF: torch raises several types
        raise ValueError(f"{path}: corrupt or truncated checkpoint, cannot be read "
                         f"({type(e).__name__})") from None
    missing = [k for k in ("model", "model_config", "tokenizer")
               if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a BrgSA checkpoint (missing {missing})")
    unknown = sorted(set(ckpt["model_config"]) - {f.name for f in fields(ModelConfig)})
    if unknown:
        raise ValueError(f"{path}: model_config has field(s) {unknown} that this code's ModelConfig "
                         f"does not know (written by another version?)")
    return ckpt


def _resumable(path: Path, mcfg: ModelConfig) -> dict:
    try:
        ckpt = read_checkpoint(path)
    except ValueError as e:
        raise ValueError(f"cannot resume: {e}; move it away to start a new run there") from None
    missing = [k for k in ("optimizer", "scaler", "step", "rng") if k not in ckpt]
    if missing:
        raise ValueError(f"cannot resume: {path} holds no training state (missing {missing}); it "
                         f"can be evaluated (eval.py --ckpt) but not resumed")
    stored = checkpoint_config(ckpt)
    differ = [f"{f.name} {getattr(stored, f.name)} (checkpoint) vs {getattr(mcfg, f.name)} (now)"
              for f in fields(mcfg) if f.name not in ("vocab_size", "grad_checkpoint")
              and getattr(stored, f.name) != getattr(mcfg, f.name)]
    if differ:
        raise ValueError(f"cannot resume: {path} was trained with another model config: "
                         f"{'; '.join(differ[:4])}{' ...' if len(differ) > 4 else ''}; resume with "
                         f"the same --preset and --text_weights, or pick another --out_dir")
    return ckpt


def checkpoint_config(ckpt: dict) -> ModelConfig:
    """The ModelConfig stored in a checkpoint read by read_checkpoint (lists back to tuples)."""
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                          for k, v in ckpt["model_config"].items()})
