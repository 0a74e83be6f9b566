"""The LLM backend of prepare/summarize.py: any OpenAI-compatible chat-completions endpoint.

Follows the paper's semantic summarization by GPT-4o: a fixed prompt asks for one short finding per
sentence with the 18 CT-RATE class names as the preferred wording; the reply must be a JSON list of
strings (parsed strictly). Works with vLLM, llama.cpp, Ollama or a hosted API, standard library
only (urllib): temperature 0, a timeout, retries with exponential backoff and jitter on 408 / 409 /
425 / 429 / 5xx and dropped connections, none when the connection is refused or the host name does
not resolve (nothing there to wait for), and an API key read from the environment, sent only as a
Bearer header and scrubbed from every error message.

    python -m prepare.summarize reports.csv --out summaries.jsonl --backend llm --url http://127.0.0.1:8000/v1
"""
import http.client
import json
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request

from prepare.summarize_rules import CLASSES, NO_FINDING, check_text

PROMPT = (
    "You summarise chest CT radiology reports for training a vision-language model.\n"
    "Rewrite the report as short, high-level English sentences:\n"
    "- one finding per sentence; keep side, location and severity when given;\n"
    "- drop normal statements, negated findings, measurements, image/series numbers, technique and "
    "recommendations;\n"
    "- use these names whenever a finding is one of them: " + "; ".join(c.lower() for c in CLASSES) + ";\n"
    "  e.g. 'pleural fluid' -> 'pleural effusion', 'enlarged heart' -> 'cardiomegaly', 'calcified "
    "atheroma in the aorta' -> 'arterial wall calcification', 'ground glass' -> 'ground-glass lung "
    "opacity', 'pacemaker' -> 'medical material (pacemaker)';\n"
    "- keep other abnormal findings too, in the same short style;\n"
    "- if nothing is abnormal, reply [\"No significant abnormality.\"].\n"
    "Reply with a JSON list of strings and nothing else."
)
LLM_DEFAULTS = dict(url="http://127.0.0.1:8000/v1", model="gpt-4o", api_key_env="OPENAI_API_KEY",
                    timeout=120.0, retries=4)
RETRY_STATUS = {408, 409, 425, 429}  # plus every 5xx; other 4xx (bad key, bad model) would fail again


class SummaryError(RuntimeError):
    """A report could not be summarised (bad reply, HTTP error, retries exhausted)."""


class ServerUnreachable(SummaryError):
    """Nothing listens at the URL (connection refused) or its host name does not resolve: a retry
    would wait for nothing, so it fails at once."""


def parse_reply(content: str) -> list[str]:
    """Strictly parse the model's reply: a JSON list of non-empty strings, optionally in a ```json fence."""
    body = content.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, re.S | re.I)
    body = fence.group(1) if fence else body
    try:
        value = json.loads(body)
    except json.JSONDecodeError as e:
        raise SummaryError(f"reply is not JSON ({e.msg}): {content[:120]!r}") from None
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise SummaryError(f"reply is not a JSON list of strings: {content[:120]!r}")
    sentences = [s.strip() for s in value if s.strip()]
    return sentences or [NO_FINDING]


class LLMClient:
    """A chat-completions client: temperature 0, timeout, retries with exponential backoff + jitter.

    The API key is read from the environment variable `api_key_env` (absent: no Authorization
    header, as local servers need none); it is sent only as a Bearer header and scrubbed from
    every error message."""

    def __init__(self, url: str = LLM_DEFAULTS["url"], model: str = LLM_DEFAULTS["model"],
                 api_key_env: str = LLM_DEFAULTS["api_key_env"], timeout: float = LLM_DEFAULTS["timeout"],
                 retries: int = LLM_DEFAULTS["retries"],
                 backoff: float = 1.0, max_backoff: float = 60.0, seed: int | None = None,
                 sleep=time.sleep):
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.retries = model, timeout, retries
        self.backoff, self.max_backoff, self.sleep = backoff, max_backoff, sleep
        self._key = os.environ.get(api_key_env, "")
        self._rng, self._rng_lock = random.Random(seed), threading.Lock()
        self.delays: list[float] = []  # every backoff slept, for logs and tests

    def summarize(self, text: str) -> list[str]:
        payload = {"model": self.model, "temperature": 0,
                   "messages": [{"role": "system", "content": PROMPT},
                                {"role": "user", "content": check_text(text)}]}
        reply = self._post(json.dumps(payload).encode("utf-8"))
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise SummaryError(f"response has no choices[0].message.content: "
                               f"{self._scrub(str(reply)[:120])!r}") from None
        if not isinstance(content, str):
            raise SummaryError("response content is not a string")
        return parse_reply(content)

    def _post(self, data: bytes) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
            retry_after = None
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    body = response.read()
                return json.loads(body.decode("utf-8"))
            except urllib.error.HTTPError as e:
                problem = f"HTTP {e.code} from {self.endpoint}: {self._error_body(e)}"
                if e.code not in RETRY_STATUS and e.code < 500:
                    raise SummaryError(problem) from None
                retry_after = e.headers.get("Retry-After")
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise SummaryError(f"response from {self.endpoint} is not JSON") from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                cause = e.reason if isinstance(e, urllib.error.URLError) else e
                if isinstance(cause, ConnectionRefusedError):
                    raise ServerUnreachable(f"connection refused by {self.endpoint}: is the server "
                                            f"running, and is the URL right?") from None
                if isinstance(cause, socket.gaierror):
                    raise ServerUnreachable(f"cannot resolve the host of {self.endpoint} "
                                            f"({self._scrub(str(cause))})") from None
                # timeouts, reset/dropped connections, truncated bodies: all worth a retry
                problem = f"{type(e).__name__} talking to {self.endpoint}: {self._scrub(str(e))}"
            if attempt == self.retries:
                raise SummaryError(f"{problem} (gave up after {attempt + 1} attempts)")
            self._wait(attempt, retry_after)
        raise AssertionError("unreachable")

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        with self._rng_lock:
            jitter = 0.5 + self._rng.random()  # spreads retries of parallel workers apart
        delay = min(self.max_backoff, self.backoff * 2 ** attempt) * jitter
        if retry_after and retry_after.strip().replace(".", "", 1).isdigit():
            delay = max(delay, min(self.max_backoff, float(retry_after)))
        self.delays.append(delay)
        self.sleep(delay)

    def _error_body(self, error: urllib.error.HTTPError) -> str:
        try:
            return self._scrub(error.read(300).decode("utf-8", "replace"))
        except (OSError, http.client.HTTPException):
            return "(no body)"

    def _scrub(self, message: str) -> str:
        return message.replace(self._key, "***") if self._key else message
