"""Semantic summarization of radiology reports (BrgSA, arXiv 2501.03565, section "semantic summarization").

The paper has GPT-4o rewrite every report into short, high-level sentences: one finding per sentence,
normal statements and measurements dropped, wording normalised toward the abnormality vocabulary.
Training then draws min(5, n) of those sentences per report. This file offers two backends:

- "rules" (default, offline): sentence split -> clause split -> negation detection -> every positive
  finding of the 18 CT-RATE classes becomes one short sentence that contains the class name (with side,
  location and severity qualifiers); other positive findings are kept as shortened clauses.
- "llm": any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp, Ollama, a hosted API),
  standard library only (urllib), fixed prompt, strict JSON parsing, retries with backoff.

Results are cached in a JSONL file keyed by sha256(report text), appended and fsynced per report, so a
crash loses nothing and a rerun only does the missing reports; each line also names the volumes or
accession numbers whose report it is ("names"), so the summaries join back to the reports.

The backends live in prepare/summarize_rules.py and prepare/summarize_llm.py; this file holds the
dispatcher, the cache, batch runs and the command line.

    python -m prepare.summarize reports.csv --out summaries.jsonl [--backend llm --url http://127.0.0.1:8000/v1]
"""
import argparse
import concurrent.futures
import contextlib
import csv
import hashlib
import json
import os
import sys
import threading
import time
from functools import partial
from pathlib import Path

from prepare.files import REASONS, WriteError, exit_code, run_lock, sigterm_as_interrupt
from prepare.summarize_llm import LLM_DEFAULTS, LLMClient, SummaryError
from prepare.summarize_rules import check_text, summarize_rules


RULE_WORDING = {"rules": "class", "rules_report": "report"}  # rule backends -> summarize_rules wording
BACKENDS = (*RULE_WORDING, "llm")


def summarize(text: str, backend: str = "rules", **llm_options) -> list[str]:
    """Summarise one report into a list of short sentences (never empty).

    backend "rules" is offline and deterministic (class findings named with the class name);
    "rules_report" is the same but keeps the report's own wording for them; "llm" calls an
    OpenAI-compatible endpoint (options: url, model, api_key_env, timeout, retries; see LLMClient)."""
    text = check_text(text)
    if backend in RULE_WORDING:
        return summarize_rules(text, RULE_WORDING[backend])
    if backend == "llm":
        return LLMClient(**llm_options).summarize(text)
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


# ---------------------------------------------------------------------------------------------------
# Cache and batch runs
# ---------------------------------------------------------------------------------------------------

def report_key(text: str) -> str:
    """The cache key of a report: sha256 of its UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_cache(path: Path, source: str | None = None) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(summaries, errors) by key; later lines win; unreadable lines (a torn last line) are skipped.
    With `source`, lines written by another backend/model are ignored (lines without one count)."""
    done: dict[str, list[str]] = {}
    errors: dict[str, str] = {}
    if not path.exists():
        return done, errors
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
                key = record["key"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
            if source and record.get("source", source) != source:
                continue
            summary = record.get("summary")
            if isinstance(summary, list) and all(isinstance(s, str) for s in summary):
                done[key] = summary
                errors.pop(key, None)
            elif "error" in record and key not in done:
                errors[key] = str(record["error"])
    return done, errors


def load_cache(path, source: str | None = None) -> dict[str, list[str]]:
    """The finished summaries in a JSONL cache, by report_key (errors are left out: they get retried).
    `source` ("rules" or "llm:<model>") keeps only the lines that backend wrote."""
    return _read_cache(Path(path), source)[0]


class _CacheWriter:
    """Appends one JSON line per finished report, flushed and fsynced so that a crash loses nothing."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self.file = open(path, "a", encoding="utf-8")
        if torn:  # start on a fresh line so that the torn one stays the only bad line
            self.file.write("\n")
        self.lock = threading.Lock()

    def write(self, record: dict) -> None:
        with self.lock:
            try:
                self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
                self.file.flush()
                os.fsync(self.file.fileno())
            except OSError as e:  # a full disk: every summary before this one is kept, whole
                raise WriteError(f"{self.file.name}: could not be written "
                                 f"({REASONS.get(e.errno, e.strerror)})") from None

    def close(self) -> None:
        self.file.close()


class BatchStopped(SummaryError):
    """max_failures reports in a row failed on the server's side: the batch stopped early (every
    finished report is in the cache, a rerun resumes)."""


MAX_FAILURES = 10  # consecutive server-side failures that stop a batch


def run_batch(texts: list[str], cache_path=None, backend: str = "rules", workers: int = 8,
              progress: bool = True, names: list[str] | None = None, max_failures: int = MAX_FAILURES,
              **llm_options) -> tuple[dict[str, list[str]], dict[str, str], dict]:
    """Summarise the unique texts not already in the cache.

    names (parallel to texts: volume names or accession numbers) go into each new cache line as
    "names", every name whose row holds that text, so the cache joins back to the reports; lines
    without them (older caches) read the same.
    Returns (summaries by text, errors by text, counts {"done", "cached", "failed"}). Raises
    BatchStopped after max_failures consecutive server-side failures (0 = never): with the server
    down, each further report would only add its own timeout and back-off."""
    wrong = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if wrong is not None:
        raise TypeError(f"texts[{wrong}] is {type(texts[wrong]).__name__}, expected str")
    unique = list(dict.fromkeys(texts))
    names_of = _names_by_text(texts, names)
    cache_path = Path(cache_path) if cache_path else None
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    # one cache file may hold several backends' summaries; a run reuses only its own
    source = backend if backend in RULE_WORDING else f"llm:{llm_options.get('model', LLM_DEFAULTS['model'])}"
    cached = _read_cache(cache_path, source)[0] if cache_path else {}
    summaries = {t: cached[report_key(t)] for t in unique if report_key(t) in cached}
    todo = [t for t in unique if t not in summaries]
    errors: dict[str, str] = {}
    stack = contextlib.ExitStack()
    if cache_path and todo:  # one writer per cache: a second run refuses (prepare/files.py)
        stack.enter_context(run_lock(cache_path.with_name(cache_path.name + ".lock"), "summarize"))
    writer = _CacheWriter(cache_path) if cache_path and todo else None
    work = (LLMClient(**llm_options).summarize if backend == "llm"
            else partial(summarize_rules, wording=RULE_WORDING[backend]))
    meter = _Progress(len(todo), len(summaries), progress)
    in_a_row = [0]  # consecutive server-side failures

    def finish(text: str, result: list[str] | None, error: str | None, server_fault: bool) -> None:
        if result is not None:
            summaries[text] = result
        else:
            errors[text] = error
        if writer:
            key = report_key(text)
            writer.write({"key": key, "source": source,
                          **({"names": names_of[text]} if text in names_of else {}),
                          **({"summary": result} if result is not None else {"error": error})})
        meter.step(error is not None)
        in_a_row[0] = in_a_row[0] + 1 if server_fault else 0
        if max_failures and in_a_row[0] >= max_failures:
            raise BatchStopped(f"stopped after {in_a_row[0]} reports in a row failed (last: {error}); "
                               f"{len(summaries)} summaries are kept"
                               + (f" in {cache_path}, a rerun resumes" if cache_path else ""))

    try:
        if backend == "llm" and workers > 1:  # network-bound: overlap requests, at most `workers` in flight
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
            try:
                futures = {pool.submit(_attempt, work, t): t for t in todo}
                for future in concurrent.futures.as_completed(futures):
                    finish(futures[future], *future.result())
            finally:  # on Ctrl-C, drop the queued reports instead of waiting for all of them
                pool.shutdown(wait=False, cancel_futures=True)
        else:
            for text in todo:
                finish(text, *_attempt(work, text))
    finally:
        meter.close()
        if writer:
            writer.close()
        stack.close()
    counts = {"done": len(todo) - len(errors), "cached": len(unique) - len(todo), "failed": len(errors)}
    return summaries, errors, counts


def _names_by_text(texts: list[str], names: list[str] | None) -> dict[str, list[str]]:
    """{text: the names of every row holding it}; {} without names."""
    if names is not None and len(names) != len(texts):
        raise ValueError(f"names has {len(names)} entries for {len(texts)} texts")
    out: dict[str, list[str]] = {}
    for n, t in zip(names or (), texts):
        out.setdefault(t, []).append(str(n))
    return out


def _attempt(work, text: str) -> tuple[list[str] | None, str | None, bool]:
    """-> (summary, None, False), or (None, error, whether the server is at fault, not the text)."""
    try:
        return work(text), None, False
    except SummaryError as e:
        return None, f"{type(e).__name__}: {e}", True
    except (ValueError, TypeError) as e:
        return None, f"{type(e).__name__}: {e}", False


class _Progress:
    def __init__(self, total: int, cached: int, enabled: bool):
        self.total, self.cached, self.enabled = total, cached, enabled
        self.n = self.failed = 0
        self.start = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()  # a log file gets whole lines, a terminal one updating line

    def step(self, failed: bool) -> None:
        self.n += 1
        self.failed += failed
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.5 or self.n == self.total):
            self.last = now
            rate = self.n / max(now - self.start, 1e-9)
            line = (f"summarize: {self.n}/{self.total} new ({self.cached} cached, {self.failed} "
                    f"failed, {rate:.1f}/s)")
            print("\r" + line if self.tty else line, end="" if self.tty else "\n",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.n and self.tty:
            print(file=sys.stderr)


def summarize_all(texts: list[str], cache_path=None, backend: str = "rules", workers: int = 8,
                  progress: bool = True, names: list[str] | None = None,
                  max_failures: int = MAX_FAILURES, **llm_options) -> dict[str, list[str]]:
    """{report text: summary sentences} for every text that could be summarised, using and updating
    the cache (names: see run_batch). Failures are left out of the result and reported on stderr
    (and in the cache)."""
    summaries, errors, counts = run_batch(texts, cache_path, backend, workers, progress, names,
                                          max_failures, **llm_options)
    if errors:
        first = next(iter(errors.values()))
        print(f"summarize: {counts['failed']} report(s) failed, e.g. {first}", file=sys.stderr)
    return summaries


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------

def read_reports(path: Path, text_column: str | None = None) -> tuple[list[str], list[str]]:
    """(row names, report texts) from a CSV with `text_column`, `report_text`, or CT-RATE's
    Findings_EN + Impressions_EN (joined with a space, as CT-RATE's report is Findings + Impressions)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, strict=True)  # strict: an unterminated quote is an error
            rows, columns = list(reader), list(reader.fieldnames or [])
    except csv.Error as e:  # a quote left open would swallow the rows after it into one report
        raise SystemExit(f"{path}: malformed CSV near line {reader.line_num} ({e}); check for an "
                         f"unterminated quote") from None
    except UnicodeDecodeError as e:
        raise SystemExit(f"{path}: not valid UTF-8 (byte {e.start}); re-save the CSV as UTF-8") from None
    except OSError as e:
        raise SystemExit(f"{path}: cannot read reports CSV ({e.strerror})") from None
    name_col = next((c for c in ("VolumeName", "AccessionNo") if c in columns), None)
    names = [r[name_col] if name_col else f"row {i + 2}" for i, r in enumerate(rows)]
    if text_column or "report_text" in columns:
        col = text_column or "report_text"
        if col not in columns:
            raise SystemExit(f"{path}: no column {col!r}; columns are {columns}")
        return names, [r[col] or "" for r in rows]
    if {"Findings_EN", "Impressions_EN"} <= set(columns):
        return names, [f"{r['Findings_EN'] or ''} {r['Impressions_EN'] or ''}".strip() for r in rows]
    raise SystemExit(f"{path}: expected a 'report_text' column or 'Findings_EN' + 'Impressions_EN' "
                     f"(or pass --text_column); columns are {columns}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Summarise radiology reports into short finding sentences "
                                 "(BrgSA semantic summarization), with a resumable JSONL cache.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("reports", type=Path, help="reports CSV (report_text, or Findings_EN + Impressions_EN)")
    ap.add_argument("--out", type=Path, required=True,
                    help="JSONL cache/output, one {key, names, summary|error} line per report "
                    "(names: the rows' VolumeName or AccessionNo, else 'row N'); reruns resume it")
    ap.add_argument("--backend", choices=list(BACKENDS), default="rules",
                    help="rules: offline, deterministic, class findings named with the class name; "
                         "rules_report: the same keeping the report's own wording; llm: "
                         "OpenAI-compatible endpoint")
    ap.add_argument("--url", default=LLM_DEFAULTS["url"],
                    help="llm: base URL; POSTs go to {url}/chat/completions")
    ap.add_argument("--model", default=LLM_DEFAULTS["model"], help="llm: model name sent in the request")
    ap.add_argument("--api_key_env", default=LLM_DEFAULTS["api_key_env"],
                    help="llm: environment variable holding the API key (sent as a Bearer header, "
                    "never printed)")
    ap.add_argument("--workers", type=int, default=8, help="llm: requests in flight at once")
    ap.add_argument("--timeout", type=float, default=LLM_DEFAULTS["timeout"],
                    help="llm: seconds to wait for one reply")
    ap.add_argument("--retries", type=int, default=LLM_DEFAULTS["retries"],
                    help="llm: extra attempts on 429/5xx/timeouts/dropped connections (exponential backoff)")
    ap.add_argument("--max_failures", type=int, default=MAX_FAILURES,
                    help="llm: stop after this many reports in a row fail on the server's side "
                    "(finished ones stay cached; 0 = never stop)")
    ap.add_argument("--text_column", default=None, help="CSV column holding the report text")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    args = ap.parse_args(argv)

    names, texts = read_reports(args.reports, args.text_column)
    options = {} if args.backend in RULE_WORDING else dict(
        url=args.url, model=args.model, api_key_env=args.api_key_env, timeout=args.timeout,
        retries=args.retries)
    try:
        with sigterm_as_interrupt():
            summaries, errors, counts = run_batch(texts, args.out, args.backend, args.workers,
                                                  not args.quiet, names, args.max_failures, **options)
    except (BatchStopped, ValueError) as e:  # the server gave up, a second run, a full disk
        print(f"\nsummarize: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM
        print(f"\ninterrupted: every finished report is saved in {args.out}; rerun to resume",
              file=sys.stderr)
        return exit_code(e)
    name_of = {t: n for n, t in zip(names, texts)}
    for text, error in list(errors.items())[:10]:
        print(f"failed: {name_of.get(text, '?')}: {error}", file=sys.stderr)
    print(f"{len(texts)} rows, {len(set(texts))} unique reports: {counts['done']} done, "
          f"{counts['cached']} cached, {counts['failed']} failed -> {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
