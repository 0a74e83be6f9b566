"""How well do report summaries keep the 18 CT-RATE findings? Measured on 400 real reports.

The data is a sample of CT-CLIP's report-classifier set (text_classifier/data/train.csv of the
public github.com/ibrahimethemhamamci/CT-CLIP repository: report texts with 18 manual labels,
CC BY-NC-SA 4.0), as a CSV with a report_text column and the 18 label columns. For each label, a report counts as predicted positive when `summarize_rules.finding_classes`
finds the class in the text; recall and precision are computed against the manual labels twice:
on the full report text (the ceiling a summary can reach with the same vocabulary) and on the summary.
A summary should lose little recall relative to the full text (BrgSA wants every finding kept) and
must not invent findings (precision).

    python benchmarks/summary_quality.py REPORTS.csv [--backend rules|llm] [--cache summaries.jsonl] [--errors N]
"""
import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from prepare import summarize, summarize_llm, summarize_rules  # noqa: E402  (after the path set-up above)

def load_reports(path: Path) -> tuple[list[str], list[set[str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in ["report_text", *summarize_rules.CLASSES] if c not in rows[0]]
    if missing:
        raise SystemExit(f"{path}: missing columns {missing}")
    return [r["report_text"] for r in rows], [{c for c in summarize_rules.CLASSES if r[c] == "1"} for r in rows]


def scores(predicted: list[set[str]], truth: list[set[str]]) -> dict[str, tuple[float, float]]:
    """Per class (recall, precision); precision of a class never predicted counts as 1."""
    out = {}
    for c in summarize_rules.CLASSES:
        tp = sum(c in p and c in t for p, t in zip(predicted, truth))
        pos = sum(c in t for t in truth)
        pred = sum(c in p for p in predicted)
        out[c] = (tp / pos if pos else 1.0, tp / pred if pred else 1.0)
    return out


def macro(s: dict[str, tuple[float, float]]) -> tuple[float, float]:
    return (sum(r for r, _ in s.values()) / len(s), sum(p for _, p in s.values()) / len(s))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, help="reports CSV: report_text and the 18 label columns")
    ap.add_argument("--backend", default="rules", choices=["rules", "llm"], help="summary backend")
    ap.add_argument("--cache", type=Path, default=None, help="JSONL summary cache (needed for llm)")
    ap.add_argument("--url", default=summarize_llm.LLM_DEFAULTS["url"], help="llm: endpoint base URL")
    ap.add_argument("--model", default=summarize_llm.LLM_DEFAULTS["model"], help="llm: model name")
    ap.add_argument("--api_key_env", default=summarize_llm.LLM_DEFAULTS["api_key_env"],
                    help="llm: environment variable holding the API key")
    ap.add_argument("--workers", type=int, default=8, help="llm: requests in flight")
    ap.add_argument("--errors", type=int, default=0, help="print this many example errors per label")
    args = ap.parse_args()

    texts, truth = load_reports(args.data)
    llm = {} if args.backend == "rules" else dict(url=args.url, model=args.model,
                                                  api_key_env=args.api_key_env)
    summaries = summarize.summarize_all(texts, cache_path=args.cache, backend=args.backend,
                                        workers=args.workers, progress=args.backend == "llm", **llm)
    if len(summaries) < len(texts):
        print(f"{len(texts) - len(summaries)} reports have no summary (failed); they count as misses")
    full = [summarize_rules.finding_classes(t) for t in texts]
    summ = [summarize_rules.finding_classes(" ".join(summaries[t])) if summaries.get(t) else set() for t in texts]
    s_full, s_sum = scores(full, truth), scores(summ, truth)

    print(f"{len(texts)} reports, backend={args.backend}, "
          f"{sum(map(len, summaries.values())) / len(texts):.1f} summary sentences per report")
    print(f"{'label':34s} {'n+':>4s} | {'full R':>6s} {'full P':>6s} | {'summ R':>6s} {'summ P':>6s}")
    for c in summarize_rules.CLASSES:
        n = sum(c in t for t in truth)
        (rf, pf), (rs, ps) = s_full[c], s_sum[c]
        print(f"{c:34s} {n:4d} | {rf:6.3f} {pf:6.3f} | {rs:6.3f} {ps:6.3f}")
    (rf, pf), (rs, ps) = macro(s_full), macro(s_sum)
    print(f"{'macro':34s} {'':4s} | {rf:6.3f} {pf:6.3f} | {rs:6.3f} {ps:6.3f}")
    print(f"summary recall / full-text recall = {rs / rf:.3f} (target >= 0.90); "
          f"summary macro precision = {ps:.3f} (target >= 0.85)")
    if args.errors:
        for c in summarize_rules.CLASSES:
            fn = [t for t, p, y in zip(texts, summ, truth) if c in y and c not in p][:args.errors]
            fp = [(t, summaries[t]) for t, p, y in zip(texts, summ, truth)
                  if c not in y and c in p][:args.errors]
            for t in fn:
                print(f"\n[{c}] missed: {t[:600]}")
            for t, s in fp:
                print(f"\n[{c}] false positive: {' | '.join(s)}")


if __name__ == "__main__":
    main()
