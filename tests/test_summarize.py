"""Tests for prepare/summarize.py and its rules and LLM backends: rule-based summaries (negation,
normalisation, real report sentences), the LLM client against a local chat-completions server (retries, timeouts, bad replies, key hygiene) and
the resumable cache (torn lines, SIGKILL and Ctrl-C mid-run). Longer than 400 lines because the local
server and the crash tests need their own scaffolding; each section reads on its own.

    python -m pytest tests/test_summarize.py -q
"""
import csv
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from prepare import summarize, summarize_llm, summarize_rules

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-test-0123456789abcdef-SECRET"


# ---------------------------------------------------------------------------------------------------
# Rule-based backend
# ---------------------------------------------------------------------------------------------------

def test_split_sentences_abbreviations_lists_newlines():
    text = ("1. Pleural effusion on the right. 2. A nodule of 5 mm. in size, e.g. in the apex.\n"
            "Aorta diameter 3.5 cm. \"\" Hiatal hernia; emphysema")
    assert summarize_rules.split_sentences(text) == [
        "Pleural effusion on the right", "A nodule of 5 mm. in size, e.g. in the apex",
        "Aorta diameter 3.5 cm", "Hiatal hernia", "emphysema"]


@pytest.mark.parametrize("text, expected", [
    ("No pleural effusion or pneumothorax.", set()),
    ("Pleural effusion is not seen.", set()),
    ("Pleural effusion and atelectasis were not observed.", set()),
    ("There is no evidence of consolidation.", set()),
    ("The lungs are free of nodules.", set()),
    ("Heart size is within normal limits.", set()),
    ("Atelectasis without pleural effusion.", {"Atelectasis"}),
    ("No pleural effusion, but there is consolidation in the left lower lobe.", {"Consolidation"}),
    ("Emphysema is present and no nodule was detected.", {"Emphysema"}),
    ("No significant change in the size of the nodule in the right upper lobe.", {"Lung nodule"}),
    ("Pneumonia cannot be ruled out; consolidation is seen.", {"Consolidation"}),
    ("Interlobular septa are not thickened.", set()),
    ("Coronary arteries show no calcification.", set()),
    ("Calcified plaques in the coronary arteries and aorta.",
     {"Coronary artery wall calcification", "Arterial wall calcification"}),
    ("The nodule is no longer seen.", set()),
    ("Pleural effusion has resolved.", set()),
])
def test_negation_scope(text, expected):
    assert summarize_rules.finding_classes(text) == expected


# The phrasings the synthetic report generator uses, with the class each must map to.
SYNTHETIC = {
    "Bilateral pleural effusion is observed.": "Pleural effusion",
    "Pleural fluid on the left.": "Pleural effusion",
    "Enlarged heart.": "Cardiomegaly",
    "Cardiothoracic ratio increased.": "Cardiomegaly",
    "Calcified atherosclerotic plaques in the aortic wall.": "Arterial wall calcification",
    "Calcified atheroma in the aorta.": "Arterial wall calcification",
    "Coronary calcification is seen.": "Coronary artery wall calcification",
    "Pericardial effusion is present.": "Pericardial effusion",
    "Hiatus hernia.": "Hiatal hernia",
    "Pathologically sized lymph nodes in the mediastinum.": "Lymphadenopathy",
    "Lymph nodes enlarged in the right hilum.": "Lymphadenopathy",
    "Centrilobular emphysema in both upper lobes.": "Emphysema",
    "Subsegmental atelectasis in the right lower lobe.": "Atelectasis",
    "A 6 mm nodule in the left upper lobe.": "Lung nodule",
    "Ground glass areas in the right lung.": "Lung opacity",
    "Sequelae fibrotic changes at the left apex.": "Pulmonary fibrotic sequela",
    "Mosaic attenuation in both lungs.": "Mosaic attenuation pattern",
    "Bronchial wall thickening is observed.": "Peribronchial thickening",
    "Consolidation in the left lower lobe.": "Consolidation",
    "Cylindrical bronchiectasis in both lower lobes.": "Bronchiectasis",
    "Septal thickening in both lungs.": "Interlobular septal thickening",
    "A pacemaker is seen.": "Medical material",
    "Sternotomy wires.": "Medical material",
    "Port catheter in the superior vena cava.": "Medical material",
}
NORMAL = ("Trachea and both main bronchi are open. Heart contour and size are normal. "
          "No pleural effusion was detected. No enlarged lymph nodes were detected. "
          "Pericardial effusion-thickening was not observed. No nodule or consolidation is detected.")


@pytest.mark.parametrize("sentence, cls", SYNTHETIC.items())
def test_synthetic_phrasing_normalised_to_class_name(sentence, cls):
    summary = summarize.summarize(sentence + " " + NORMAL)
    assert summarize_rules.finding_classes(sentence + " " + NORMAL) == {cls}
    assert len(summary) == 1 and cls.lower() in summary[0].lower(), summary
    assert summarize_rules.finding_classes(" ".join(summary)) == {cls}


def test_summary_keeps_qualifiers_and_drops_normals_and_measurements():
    report = ("Minimal pleural effusion on the right. Thoracic aorta diameter is 38 mm. "
              "Subsegmental atelectasis in the left lung lower lobe. Left-facing scoliosis is observed. "
              "Correlation with clinical findings is recommended. " + NORMAL)
    assert summarize.summarize(report) == ["Subsegmental atelectasis in the left lower lobe.",
                                   "Minimal right pleural effusion.", "Left-facing scoliosis."]


def test_no_finding_gives_one_sentence_never_empty():
    assert summarize.summarize(NORMAL) == [summarize_rules.NO_FINDING]
    assert summarize_rules.finding_classes(summarize_rules.NO_FINDING) == set()


@pytest.mark.parametrize("bad, error, words", [
    ("", ValueError, "empty"), ("  \n\t ", ValueError, "empty"), (None, TypeError, "str"),
    (42, TypeError, "str"), (b"Pleural effusion \xff\xfe", ValueError, "UTF-8"),
])
def test_bad_input_errors(bad, error, words):
    with pytest.raises(error, match=words):
        summarize.summarize(bad)


def test_report_wording_keeps_the_reports_words_for_the_same_findings(tmp_path):
    text = ("Millimetric nonspecific nodules are observed in both lungs. Minimal atelectatic changes "
            "in the lower lobes. No pleural effusion. Thoracic aorta diameter is 38 mm.")
    named = summarize.summarize(text)
    own = summarize.summarize(text, backend="rules_report")
    assert named == ["Minimal atelectasis in the lower lobe.", "Millimetric bilateral lung nodules."]
    assert own == ["Minimal atelectatic changes in the lower lobes.",
                   "Millimetric nonspecific nodules in both lungs."]
    assert all(summarize_rules.finding_classes(a) == summarize_rules.finding_classes(b)
               for a, b in zip(named, own))  # the same findings, in other words
    summaries, _, _ = summarize.run_batch([text], tmp_path / "c.jsonl", "rules_report", progress=False)
    assert summaries[text] == own
    assert summarize.load_cache(tmp_path / "c.jsonl", "rules") == {}  # cached under its own name
    with pytest.raises(ValueError, match="wording"):
        summarize_rules.summarize_rules(text, wording="mixed")


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        summarize.summarize("Emphysema.", backend="gpt")


def _real_reports(shared_data):
    path = shared_data / "ctclip_reports_18labels" / "reports_shared.csv"
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# Sentences copied from the real reports; the test checks that each one really occurs there.
REAL_SENTENCES = {
    "Pericardial effusion-thickening was not observed.": set(),
    "No enlarged lymph nodes were detected in prevascular, pre-paratracheal, subcarinal or bilateral "
    "hilar-axillary pathological dimensions.": set(),
    "Aeration of both lung parenchyma is normal and no nodular or infiltrative lesion is detected in the "
    "lung parenchyma.": set(),
    "Mediastinal main vascular structures, heart contour, size are normal.": set(),
    "Pleural effusion-thickening was not detected in both hemithorax.": set(),
    "No pathological LAP was detected in the mediastinum.": set(),
    "Millimetric calcific plaque is observed in the descending aorta.": {"Arterial wall calcification"},
    "There is a right upper and lower paratracheal millimetric lymph node.": {"Lymphadenopathy"},
    "Patchy areas of consolidation involving the middle lobe are observed most prominently in the right "
    "lung.": {"Consolidation"},
    "A port catheter extending from the right internal jugular vein to the superior-right atrium junction "
    "of the vena cava is observed.": {"Medical material"},
    "Pleuroparenchymal sequelae density increases were observed in both lung apexes.":
        {"Pulmonary fibrotic sequela"},
}


@pytest.mark.parametrize("sentence, expected", REAL_SENTENCES.items())
def test_real_report_sentences(shared_data, sentence, expected):
    assert any(sentence in r["report_text"] for r in _real_reports(shared_data)), "not a real sentence"
    assert summarize_rules.finding_classes(sentence) == expected
    summary = summarize.summarize(sentence)
    if expected:
        assert all(any(c.lower() in s.lower() for s in summary) for c in expected), summary
    else:
        assert summary == [summarize_rules.NO_FINDING]


def test_real_reports_quality_floor(shared_data):
    """Regression guard for benchmarks/summary_quality.py: summaries keep the labelled findings."""
    rows = _real_reports(shared_data)
    full = [summarize_rules.finding_classes(r["report_text"]) for r in rows]
    summ = [summarize_rules.finding_classes(" ".join(summarize.summarize(r["report_text"]))) for r in rows]
    recall, precision, recall_full = [], [], []
    for c in summarize_rules.CLASSES:
        y = [r[c] == "1" for r in rows]
        tp = sum(c in p and t for p, t in zip(summ, y))
        recall.append(tp / sum(y))
        precision.append(tp / max(1, sum(c in p for p in summ)))
        recall_full.append(sum(c in p and t for p, t in zip(full, y)) / sum(y))
    macro_r, macro_p, macro_rf = (sum(v) / len(v) for v in (recall, precision, recall_full))
    assert macro_p >= 0.88 and macro_r >= 0.95 * macro_rf and macro_rf >= 0.93, (macro_p, macro_r, macro_rf)


# ---------------------------------------------------------------------------------------------------
# LLM backend against a local chat-completions server
# ---------------------------------------------------------------------------------------------------

class FakeLLM:
    """A scripted OpenAI-compatible server. Each request takes the next scripted action, or, when the
    script is empty, the default: a JSON list echoing the report (or a malformed reply for "BAD")."""

    def __init__(self):
        self.script, self.requests = [], []
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.delay = 0.0

    def next_action(self, report: str):
        with self.lock:
            if self.script:
                return self.script.pop(0)
        if "BAD" in report:
            return ("ok", "Sure! Here are the findings: pleural effusion")
        return ("ok", json.dumps([f"Finding of {report}."]))


def _handler(fake: FakeLLM):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with fake.lock:
                fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                      "body": body})
                fake.in_flight += 1
                fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
            time.sleep(fake.delay)  # the "work": requests overlapping here were sent concurrently
            with fake.lock:  # out of flight before replying: a client may send its next request
                fake.in_flight -= 1  # as soon as it reads this reply, before this thread ends
            try:
                self._act(fake.next_action(body["messages"][-1]["content"]))
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test)

        def _act(self, action):
            kind = action[0]
            if kind == "drop":  # close the socket without any response
                self.close_connection = True
                return
            if kind == "slow":
                time.sleep(action[1])
                action = ("ok", action[2])
            if kind == "status":
                self._send(action[1], action[2].replace("{auth}", self.headers.get("Authorization", "")),
                           action[3] if len(action) > 3 else {})
                return
            reply = {"choices": [{"message": {"role": "assistant", "content": action[1]}}]}
            self._send(200, json.dumps(reply))

        def _send(self, code, text, headers=None):
            data = text.encode()
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass
    return Handler


@pytest.fixture
def llm_server():
    fake = FakeLLM()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield fake
    server.shutdown()
    server.server_close()


def _client(fake, **kw):
    opts = dict(url=fake.url, model="test-model", api_key_env="TEST_LLM_KEY", timeout=5.0, retries=3,
                backoff=0.01, max_backoff=0.05, seed=0)
    return summarize_llm.LLMClient(**{**opts, **kw})


def test_llm_normal_reply_and_request_shape(llm_server, monkeypatch):
    monkeypatch.setenv("TEST_LLM_KEY", SECRET)
    llm_server.script = [("ok", '```json\n["Right pleural effusion.", "Cardiomegaly."]\n```')]
    assert _client(llm_server).summarize("Effusion on the right. Big heart.") == [
        "Right pleural effusion.", "Cardiomegaly."]
    (req,) = llm_server.requests
    assert req["path"] == "/v1/chat/completions" and req["auth"] == f"Bearer {SECRET}"
    body = req["body"]
    assert body["model"] == "test-model" and body["temperature"] == 0
    assert body["messages"][0] == {"role": "system", "content": summarize_llm.PROMPT}
    assert body["messages"][1] == {"role": "user", "content": "Effusion on the right. Big heart."}


def test_llm_no_key_sends_no_authorization(llm_server, monkeypatch):
    monkeypatch.delenv("TEST_LLM_KEY", raising=False)
    _client(llm_server).summarize("Emphysema.")
    assert llm_server.requests[0]["auth"] is None


def test_llm_429_then_success_backs_off_with_seeded_jitter(llm_server):
    delays = []
    for _ in range(2):
        llm_server.script = [("status", 429, "{}"), ("status", 503, "{}"), ("ok", '["Emphysema."]')]
        client = _client(llm_server)
        assert client.summarize("Emphysema.") == ["Emphysema."]
        delays.append(client.delays)
    assert len(llm_server.requests) == 6
    first, second = delays[0]
    assert 0.005 <= first <= 0.015 and 0.01 <= second <= 0.03, delays  # backoff * 2**attempt * [0.5, 1.5)
    assert delays[0] == delays[1]  # the same seed gives the same jitter


def test_llm_retry_after_header_is_honoured(llm_server):
    slept = []
    llm_server.script = [("status", 429, "{}", {"Retry-After": "3"}), ("ok", '["Emphysema."]')]
    client = _client(llm_server, max_backoff=10.0, sleep=slept.append)
    assert client.summarize("Emphysema.") == ["Emphysema."] and slept == [3.0]


def test_llm_timeout_then_success(llm_server):
    llm_server.script = [("slow", 1.5, '["late"]'), ("ok", '["Atelectasis."]')]
    start = time.monotonic()
    assert _client(llm_server, timeout=0.3).summarize("Atelectasis.") == ["Atelectasis."]
    assert len(llm_server.requests) == 2 and time.monotonic() - start < 1.4


def test_llm_dropped_connection_is_retried(llm_server):
    llm_server.script = [("drop",), ("drop",), ("ok", '["Lung nodule."]')]
    assert _client(llm_server).summarize("Nodule.") == ["Lung nodule."]
    assert len(llm_server.requests) == 3


def test_llm_gives_up_after_retries_and_never_retries_400(llm_server):
    llm_server.script = [("status", 500, "{}")] * 3
    with pytest.raises(summarize_llm.SummaryError, match="HTTP 500.*after 3 attempts"):
        _client(llm_server, retries=2).summarize("Emphysema.")
    llm_server.script = [("status", 400, '{"error": "bad model"}')]
    with pytest.raises(summarize_llm.SummaryError, match="HTTP 400"):
        _client(llm_server).summarize("Emphysema.")
    assert len(llm_server.requests) == 4


@pytest.mark.parametrize("content, ok", [
    ('["A.", "B."]', ["A.", "B."]), ("```json\n[\"A.\"]\n```", ["A."]), ("```\n[]\n```", [summarize_rules.NO_FINDING]),
    ('{"sentences": ["A."]}', None), ('["A.", 3]', None), ("A. B.", None), ('["A."', None),
])
def test_parse_reply_is_strict(content, ok):
    if ok is None:
        with pytest.raises(summarize_llm.SummaryError):
            summarize_llm.parse_reply(content)
    else:
        assert summarize_llm.parse_reply(content) == ok


def test_llm_malformed_reply_is_recorded_and_run_continues(llm_server, tmp_path):
    cache = tmp_path / "s.jsonl"
    texts = ["Report one.", "BAD report.", "Report three."]
    opts = dict(url=llm_server.url, model="test-model", backoff=0.01)
    summaries, errors, counts = summarize.run_batch(texts, cache, "llm", workers=2, progress=False, **opts)
    assert counts == {"done": 2, "cached": 0, "failed": 1}
    assert set(errors) == {"BAD report."} and "not JSON" in errors["BAD report."]
    assert summaries["Report one."] == ["Finding of Report one.."]
    lines = [json.loads(line) for line in cache.read_text().splitlines()]
    assert sorted("error" in r for r in lines) == [False, False, True]
    # the error is retried on the next run (now answered properly); the others come from the cache
    llm_server.script = [("ok", '["Fixed."]')]
    summaries, errors, counts = summarize.run_batch(texts, cache, "llm", workers=2, progress=False, **opts)
    assert counts == {"done": 1, "cached": 2, "failed": 0} and summaries["BAD report."] == ["Fixed."]
    assert summarize.load_cache(cache)[summarize.report_key("BAD report.")] == ["Fixed."]


def test_llm_concurrency_is_bounded(llm_server):
    llm_server.delay = 0.1
    texts = [f"Report {i}." for i in range(6)]
    summaries, _, _ = summarize.run_batch(texts, None, "llm", workers=2, progress=False, url=llm_server.url)
    assert len(summaries) == 6 and llm_server.max_in_flight == 2


def test_api_key_never_in_errors_logs_or_cache(llm_server, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TEST_LLM_KEY", SECRET)
    echo = '{"error": "invalid key: {auth}"}'  # a server that echoes the header back
    llm_server.script = [("status", 401, echo)]
    with pytest.raises(summarize_llm.SummaryError) as info:
        _client(llm_server).summarize("Emphysema.")
    assert "401" in str(info.value) and SECRET not in str(info.value) and "***" in str(info.value)
    llm_server.script = [("status", 503, echo)] * 10
    cache = tmp_path / "s.jsonl"
    _, errors, _ = summarize.run_batch(["Emphysema.", "Atelectasis."], cache, "llm", workers=1, url=llm_server.url,
                               api_key_env="TEST_LLM_KEY", retries=1, backoff=0.001)
    out = capsys.readouterr()
    assert len(errors) == 2 and all(r["auth"] == f"Bearer {SECRET}" for r in llm_server.requests)
    assert SECRET not in out.out + out.err + cache.read_text() + json.dumps(errors)


# ---------------------------------------------------------------------------------------------------
# Cache and command line
# ---------------------------------------------------------------------------------------------------

def _write_csv(path, texts, columns=("report_text",)):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["VolumeName", *columns])
        for i, t in enumerate(texts):
            w.writerow([f"vol_{i}", *([t] if len(columns) == 1 else [t, "Impression."])])


def test_cache_torn_last_line_is_ignored_and_repaired(tmp_path):
    texts = ["Emphysema.", "Cardiomegaly.", "Hiatal hernia.", "Pleural effusion."]
    cache = tmp_path / "s.jsonl"
    summarize.run_batch(texts[:2], cache, progress=False)
    with open(cache, "a") as f:
        f.write('{"key": "%s", "source": "rules", "summ' % summarize.report_key(texts[2]))  # killed mid-write
    assert set(summarize.load_cache(cache)) == {summarize.report_key(t) for t in texts[:2]}
    summaries, _, counts = summarize.run_batch(texts, cache, progress=False)
    assert counts == {"done": 2, "cached": 2, "failed": 0} and summaries["Cardiomegaly."] == ["Cardiomegaly."]
    lines = cache.read_text().splitlines()
    assert sum(1 for line in lines if _parses(line)) == 4 and len(lines) == 5
    assert summarize.run_batch(texts, cache, progress=False)[2] == {"done": 0, "cached": 4, "failed": 0}


def _parses(line):
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def test_cache_is_per_backend(tmp_path, llm_server):
    cache = tmp_path / "s.jsonl"
    summarize.run_batch(["Emphysema."], cache, "rules", progress=False)
    _, _, counts = summarize.run_batch(["Emphysema."], cache, "llm", progress=False, url=llm_server.url)
    assert counts["done"] == 1 and len(llm_server.requests) == 1
    assert summarize.load_cache(cache, "rules")[summarize.report_key("Emphysema.")] == ["Emphysema."]


def test_sigkill_mid_run_then_resume_does_only_missing(llm_server, tmp_path):
    llm_server.delay = 0.1
    texts = [f"Report number {i}." for i in range(20)]
    reports, cache = tmp_path / "r.csv", tmp_path / "s.jsonl"
    _write_csv(reports, texts)
    cmd = [sys.executable, "-m", "prepare.summarize", str(reports), "--out", str(cache), "--backend", "llm",
           "--url", llm_server.url, "--model", "test-model", "--workers", "1", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while (not cache.exists() or cache.read_text().count("\n") < 4) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cached = summarize.load_cache(cache, "llm:test-model")
    finished = len(cached)
    assert 4 <= finished < 20
    missing = {t for t in texts if summarize.report_key(t) not in cached}
    llm_server.requests.clear()
    llm_server.delay = 0.0
    summaries, _, counts = summarize.run_batch(texts, cache, "llm", progress=False, url=llm_server.url,
                                               model="test-model")
    assert counts == {"done": 20 - finished, "cached": finished, "failed": 0}
    # the texts asked for are exactly the missing ones (a request the killed process had in flight
    # may still reach the server late: it is for a missing text too, so count texts, not requests)
    asked = {r["body"]["messages"][-1]["content"] for r in llm_server.requests}
    assert asked == missing and len(summaries) == 20


def test_cli_ct_rate_columns_and_counts(tmp_path, capsys):
    reports, cache = tmp_path / "r.csv", tmp_path / "s.jsonl"
    _write_csv(reports, ["Minimal pleural effusion.", "Minimal pleural effusion.", "No nodule."],
               columns=("Findings_EN", "Impressions_EN"))
    assert summarize.main([str(reports), "--out", str(cache), "--quiet"]) == 0
    assert "3 rows, 2 unique reports: 2 done, 0 cached, 0 failed" in capsys.readouterr().out
    cached = summarize.load_cache(cache)
    assert cached[summarize.report_key("Minimal pleural effusion. Impression.")] == ["Minimal pleural effusion."]


def test_cli_bad_csv_errors(tmp_path):
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("report_text\nPleural effusion \xe9\n".encode("latin-1"))
    with pytest.raises(SystemExit, match="latin1.csv.*UTF-8"):
        summarize.main([str(bad), "--out", str(tmp_path / "s.jsonl")])
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("VolumeName,text\nv1,Emphysema.\n")
    with pytest.raises(SystemExit, match="wrong.csv.*report_text.*Findings_EN"):
        summarize.main([str(wrong), "--out", str(tmp_path / "s.jsonl")])
    torn = tmp_path / "torn.csv"  # the open quote would swallow the next report
    torn.write_text('VolumeName,report_text\nv1,"Emphysema.\nv2,"Nodule."\nv3,Effusion.\n')
    with pytest.raises(SystemExit, match="torn.csv: malformed CSV .*unterminated quote"):
        summarize.main([str(torn), "--out", str(tmp_path / "s.jsonl")])


def test_cli_empty_report_is_a_recorded_failure(tmp_path, capsys):
    reports, cache = tmp_path / "r.csv", tmp_path / "s.jsonl"
    _write_csv(reports, ["Emphysema.", "   "])
    assert summarize.main([str(reports), "--out", str(cache), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "1 done, 0 cached, 1 failed" in captured.out
    assert "vol_1" in captured.err and "empty" in captured.err


def test_cli_help_explains_every_flag(help_lacks_defaults):
    out = subprocess.run([sys.executable, "-m", "prepare.summarize", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    for flag in ["--out", "--backend", "--url", "--model", "--api_key_env", "--workers", "--timeout",
                 "--retries", "--max_failures", "--text_column"]:
        assert flag in out
    assert help_lacks_defaults(out) == []


def test_cache_lines_name_their_volumes_and_old_lines_still_load(tmp_path, capsys):
    reports, cache = tmp_path / "r.csv", tmp_path / "s.jsonl"
    _write_csv(reports, ["Minimal pleural effusion.", "Minimal pleural effusion.", "No nodule."],
               columns=("Findings_EN", "Impressions_EN"))
    old = {"key": summarize.report_key("No nodule. Impression."), "source": "rules",
           "summary": ["Old summary."]}  # a line written before names were recorded
    cache.write_text(json.dumps(old) + "\n")
    assert summarize.main([str(reports), "--out", str(cache), "--quiet"]) == 0
    assert "1 done, 1 cached" in capsys.readouterr().out
    lines = [json.loads(x) for x in cache.read_text().splitlines()]
    assert lines[0] == old and len(lines) == 2
    assert lines[1]["names"] == ["vol_0", "vol_1"]
    assert lines[1]["key"] == summarize.report_key("Minimal pleural effusion. Impression.")
    assert summarize.load_cache(cache)[old["key"]] == ["Old summary."]
    with pytest.raises(ValueError, match="names has 1 entries for 2 texts"):
        summarize.run_batch(["a", "b"], None, names=["x"], progress=False)


def test_ctrl_c_stops_promptly_and_keeps_finished_reports(llm_server, tmp_path):
    llm_server.delay = 0.1
    texts = [f"Report number {i}." for i in range(400)]  # >= 20 s of work: it cannot end before ^C
    reports, cache = tmp_path / "r.csv", tmp_path / "s.jsonl"
    _write_csv(reports, texts)
    cmd = [sys.executable, "-m", "prepare.summarize", str(reports), "--out", str(cache), "--backend", "llm",
           "--url", llm_server.url, "--model", "m", "--workers", "2", "--quiet"]
    # A shell without job control starts background jobs with SIGINT ignored, and a child inherits
    # that (Python then installs no KeyboardInterrupt handler): give it the default, as a terminal would.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 30
    while (not cache.exists() or cache.read_text().count("\n") < 3) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 130 and "rerun to resume" in proc.stderr.read()
    lines = cache.read_text().splitlines()
    assert 3 <= len(lines) < 400 and all(_parses(line) for line in lines)
    llm_server.delay = 0.0
    _, _, counts = summarize.run_batch(texts, cache, "llm", progress=False, url=llm_server.url, model="m")
    assert counts == {"done": 400 - len(lines), "cached": len(lines), "failed": 0}


def test_summarize_all_maps_texts_and_rejects_non_str(tmp_path):
    texts = ["Emphysema.", "Enlarged heart.", "Emphysema."]
    out = summarize.summarize_all(texts, cache_path=tmp_path / "s.jsonl", progress=False)
    assert out == {"Emphysema.": ["Emphysema."], "Enlarged heart.": ["Cardiomegaly."]}
    assert summarize.load_cache(tmp_path / "s.jsonl") == {summarize.report_key(t): out[t] for t in out}
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        summarize.summarize_all(["Emphysema.", None], progress=False)


# ---------------------------------------------------------------------------------------------------
# Server down: fail fast, stop the batch, keep the cache
# ---------------------------------------------------------------------------------------------------

def _refused_url() -> str:
    """A local URL where nothing listens (the port was just free)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_llm_refused_connection_fails_at_once_without_backoff():
    client = summarize_llm.LLMClient(url=_refused_url(), retries=4, backoff=30.0, timeout=5.0)
    start = time.monotonic()
    with pytest.raises(summarize_llm.ServerUnreachable, match="connection refused .*is the server running"):
        client.summarize("Emphysema.")
    assert client.delays == [] and time.monotonic() - start < 5


def test_llm_unresolvable_host_fails_at_once(monkeypatch):
    import socket
    import urllib.error

    def no_dns(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))
    monkeypatch.setattr(summarize_llm.urllib.request, "urlopen", no_dns)
    client = summarize_llm.LLMClient(url="http://llm.invalid/v1", retries=4, backoff=30.0)
    with pytest.raises(summarize_llm.ServerUnreachable, match=r"cannot resolve the host of http://llm\.invalid"):
        client.summarize("Emphysema.")
    assert client.delays == []


def test_circuit_breaker_stops_the_batch_and_keeps_the_cache(llm_server, tmp_path):
    """Two reports done, then the server answers 500: after 3 failures in a row the batch stops;
    the two summaries stay in the cache and a rerun (server back) does only the rest."""
    llm_server.script = [("ok", '["A."]'), ("ok", '["B."]')] + [("status", 500, "{}")] * 3
    texts = [f"Report {i}." for i in range(20)]
    cache = tmp_path / "s.jsonl"
    opts = dict(url=llm_server.url, model="m", retries=0, backoff=0.01)
    with pytest.raises(summarize.BatchStopped, match=r"stopped after 3 reports in a row failed "
                                                     r"\(last: .*HTTP 500.*2 summaries are kept in"):
        summarize.run_batch(texts, cache, "llm", workers=1, progress=False, max_failures=3, **opts)
    assert len(llm_server.requests) == 5
    assert sorted(summarize.load_cache(cache, "llm:m").values()) == [["A."], ["B."]]
    _, errors, counts = summarize.run_batch(texts, cache, "llm", workers=1, progress=False, **opts)
    assert counts == {"done": 18, "cached": 2, "failed": 0} and not errors


def test_cli_server_down_stops_fast_with_a_message(tmp_path, capsys):
    reports, cache = tmp_path / "r.csv", tmp_path / "s.jsonl"
    _write_csv(reports, [f"Report {i}." for i in range(50)])
    start = time.monotonic()
    code = summarize.main([str(reports), "--out", str(cache), "--backend", "llm", "--url", _refused_url(),
                           "--workers", "1", "--max_failures", "4", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and time.monotonic() - start < 10
    assert "stopped after 4 reports in a row failed" in err and "connection refused" in err
    assert "a rerun resumes" in err and len(cache.read_text().splitlines()) == 4


def test_bad_report_text_does_not_trip_the_breaker(tmp_path):
    """Empty reports fail on their own text, not the server's: the batch goes on."""
    _, errors, counts = summarize.run_batch(["", " ", "  ", "Emphysema."], tmp_path / "s.jsonl",
                                            progress=False, max_failures=2)
    assert counts == {"done": 1, "cached": 0, "failed": 3} and len(errors) == 3


def test_spreadsheet_reports_csv_reads_as_the_plain_one(tmp_path, spreadsheet_csv):
    """Reports as a spreadsheet saves them (byte-order mark, CRLF, quoted multi-line texts with
    commas and quotes) give the same texts and the same summaries as the plain CSV."""
    import csv
    texts = ['Small nodule, right upper lobe.\nNo "pleural" effusion.', "Emphysema.\r\nCardiomegaly."]
    rows = [["VolumeName", "report_text"], ["v1", texts[0]], ["v2", texts[1]]]
    with open(tmp_path / "plain.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    plain = summarize.read_reports(tmp_path / "plain.csv")
    sheet = summarize.read_reports(spreadsheet_csv(tmp_path / "sheet.csv", rows))
    assert sheet == plain and sheet[0] == ["v1", "v2"]
    assert [summarize.summarize(t) for t in sheet[1]] == [summarize.summarize(t) for t in plain[1]]


def test_sigterm_stops_cleanly_with_whole_lines_and_a_rerun_adds_no_duplicates(llm_server, tmp_path):
    """A scheduler's SIGTERM mid-batch: exit 143 with the resume message, every cache line whole;
    the rerun does only the missing reports, so each report has one summary line."""
    llm_server.delay = 0.1
    texts = [f"Report number {i}." for i in range(20)]
    reports, cache = tmp_path / "r.csv", tmp_path / "s.jsonl"
    _write_csv(reports, texts)
    cmd = [sys.executable, "-m", "prepare.summarize", str(reports), "--out", str(cache), "--backend",
           "llm", "--url", llm_server.url, "--model", "test-model", "--workers", "1", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while (not cache.exists() or cache.read_text().count("\n") < 3) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and "Traceback" not in err and "rerun to resume" in err
    assert all(_parses(line) for line in cache.read_text().splitlines())
    assert not (tmp_path / "s.jsonl.lock").exists()  # released on the way out
    llm_server.delay = 0.0
    assert summarize.main([str(reports), "--out", str(cache), "--backend", "llm", "--url", llm_server.url,
                           "--model", "test-model", "--quiet"]) == 0
    keys = [json.loads(line)["key"] for line in cache.read_text().splitlines()]
    assert sorted(keys) == sorted(summarize.report_key(t) for t in texts)  # each report once


def test_a_second_run_on_one_cache_is_refused(tmp_path, capsys):
    from prepare import files
    reports, cache = tmp_path / "r.csv", tmp_path / "s.jsonl"
    _write_csv(reports, ["Emphysema.", "Cardiomegaly."])
    with files.run_lock(tmp_path / "s.jsonl.lock", "summarize"):
        assert summarize.main([str(reports), "--out", str(cache), "--quiet"]) == 1
    assert f"is in use by another summarize run (pid {os.getpid()}" in capsys.readouterr().err
    assert not cache.exists()  # nothing written beside the running one
    assert summarize.main([str(reports), "--out", str(cache), "--quiet"]) == 0


def test_report_wording_says_a_sentence_once(shared_data):
    """One clause naming two classes renders, in the report's wording, as that clause for both:
    the summary says it once (on the 400 real reports too, no summary repeats a sentence)."""
    text = "Calcified atherosclerotic plaques are observed in the aorta and coronary arteries. Mild emphysema."
    assert summarize.summarize(text, "rules_report") == [
        "Calcified atherosclerotic plaques in the aorta and coronary arteries.", "Mild emphysema."]
    assert len(summarize.summarize(text, "rules")) == 3  # the class wording names each class
    with open(shared_data / "ctclip_reports_18labels" / "reports_shared.csv", newline="") as f:
        for row in csv.DictReader(f):
            s = summarize.summarize(row["report_text"], "rules_report")
            assert len(s) == len(set(s)), s
