"""Generate minimal pairs with any OpenAI-compatible chat model (OpenAI, vLLM, llama.cpp, Ollama).

Per category we ask for pairs in a JSON schema (structured output where the
server supports it; plain JSON and then tolerant parsing where it does not),
check every pair with the *target* model's tokenizer, and top up in further
requests until each category has ``n_per_category`` valid pairs or the request
budget is spent. Requests run concurrently (threads; the tokenizer stays on the
main thread), 429/5xx/connection errors are retried with backoff, and valid
pairs are appended to the output JSONL as they arrive (one ``write`` + ``fsync``
per response), so an interrupted run resumes where it stopped: a rerun reads the
file, skips what is done and never writes a pair twice.

Appending is the one deliberate exception to "every write is atomic": an
append-only log is what makes resuming cheap. A record torn by a kill mid-write
can only be the last line; a rerun removes it and says so.

The API key is read from the argument, ``OPENAI_API_KEY`` or a ``.env`` file,
handed to the client and nowhere else: it is scrubbed from every error message,
and the report records the server's address without credentials.
"""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..errors import EclensError, PairFileError
from ..pairs import AlignedPair, MinimalPair, align, iter_jsonl, pair_from_record, pair_id
from ..runs import write_json
from .categories import CATEGORIES, resolve_categories
from .llm_answers import item_sentences, parse_pairs

SOURCE = "openai"
STRUCTURED_MODES = ("json_schema", "json_object", "off")
REJECT_REASONS = ("malformed", "empty", "identical", "different_length", "multiple_differences", "too_long",
                  "first_token", "duplicate", "twin")
ERROR_PREFIXES = ("grammar/", "typo")  # categories whose corrupt sentence is an error (and so gets a twin)
PAIR_SCHEMA = {
    "type": "object",
    "properties": {
        "pairs": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "clean": {"type": "string"},
                    "corrupt": {"type": "string"},
                    "clean_word": {"type": "string"},
                    "corrupt_word": {"type": "string"},
                    "twin": {"type": "string"},
                    "twin_word": {"type": "string"},
                    "twin_kind": {"type": "string", "enum": ["neutral", "acceptable", ""]},
                    "detect_word": {"type": "string"},
                },
                "required": ["clean", "corrupt", "clean_word", "corrupt_word", "twin", "twin_word", "twin_kind",
                             "detect_word"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["pairs"],
    "additionalProperties": False,
}
TOPICS = ("cooking", "school", "travel", "the weather", "sport", "office work", "family life", "shopping", "music",
          "animals", "gardening", "health", "city life", "the sea", "history", "science", "holidays", "cars",
          "books", "films", "friendship", "farming", "computers", "painting", "money", "the news", "a museum visit",
          "a birthday party", "a train journey", "a hospital", "a small village", "a football match", "the kitchen",
          "a wedding", "the mountains", "a restaurant", "the post office", "a library", "the police", "a storm")


@dataclass
class LLMConfig:
    """Settings of one LLM generation run (never holds the API key)."""

    model: str
    base_url: str | None = None
    n_per_category: int = 200
    categories: Sequence[str] | None = None
    pairs_per_request: int = 20
    max_requests: int | None = None  # this run, all categories; None: 3x the minimum plus 2 per category
    concurrency: int = 4
    max_retries: int = 5
    retry_base_s: float = 1.0
    retry_max_s: float = 30.0
    timeout_s: float = 120.0
    temperature: float = 0.9
    structured: str = "auto"  # auto (json_schema, then json_object, then off), or one of STRUCTURED_MODES
    seed: int = 0


@dataclass
class CategoryStats:
    category: str
    target: int = 0
    existing: int = 0
    requested: int = 0
    returned: int = 0
    valid: int = 0
    surplus: int = 0
    rejected: Counter = field(default_factory=Counter)
    bad_responses: int = 0
    twins: int = 0
    requests: int = 0
    retries: int = 0
    failed_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def have(self) -> int:
        return self.existing + self.valid

    @property
    def missing(self) -> int:
        return max(0, self.target - self.have)

    def row(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "rejected"}
        d["total"] = self.have
        for r in REJECT_REASONS:
            d[f"rejected_{r}"] = self.rejected.get(r, 0)
        return d


@dataclass
class GenReport:
    path: Path
    model: str
    base_url: str | None
    stats: dict[str, CategoryStats]
    structured: str
    requests: int = 0
    budget: int = 0
    seconds: float = 0.0
    dropped_partial_line: bool = False
    other_pairs: int = 0  # pairs in the file of categories not asked for this time

    @property
    def complete(self) -> bool:
        return all(s.missing == 0 for s in self.stats.values())

    def by_category(self):
        import pandas as pd

        cols = ["category", "target", "existing", "requested", "returned", "valid", "twins", "total", "surplus",
                *[f"rejected_{r}" for r in REJECT_REASONS], "bad_responses", "requests", "retries",
                "failed_requests", "prompt_tokens", "completion_tokens"]
        return pd.DataFrame([s.row() for s in self.stats.values()], columns=cols)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": SOURCE, "path": str(self.path), "model": self.model, "base_url": self.base_url,
            "structured": self.structured, "complete": self.complete, "requests": self.requests,
            "budget": self.budget, "seconds": round(self.seconds, 2),
            "dropped_partial_line": self.dropped_partial_line, "other_pairs": self.other_pairs,
            "categories": {c: s.row() for c, s in self.stats.items()},
        }


# --------------------------------------------------------------------------- key handling


def resolve_api_key(api_key: str | None = None, env_file: str | os.PathLike | None = None) -> str | None:
    """``api_key``, else ``$OPENAI_API_KEY``, else ``OPENAI_API_KEY`` from ``env_file`` or the nearest ``.env``."""
    if api_key:
        return api_key
    if os.environ.get("OPENAI_API_KEY"):
        return os.environ["OPENAI_API_KEY"]
    from dotenv import dotenv_values, find_dotenv

    path = str(env_file) if env_file else find_dotenv(usecwd=True)
    if path and Path(path).is_file():
        return dotenv_values(path).get("OPENAI_API_KEY") or None
    return None


def safe_url(url: str | None) -> str | None:
    """The URL without user, password or query (where a careless setup might keep a key)."""
    if not url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _redactor(secret: str | None) -> Callable[[str], str]:
    if not secret:
        return lambda s: s
    return lambda s: s.replace(secret, "***")


# ------------------------------------------------------------------------------ prompts


def is_error_category(category: str) -> bool:
    return category.startswith(ERROR_PREFIXES)


def build_messages(category: str, k: int, topic: str) -> list[dict[str, str]]:
    c = CATEGORIES[category]
    examples = "\n".join(json.dumps({"clean": a, "corrupt": b}) for a, b in c.examples)
    user = (
        f"Category: {category}\n"
        f"Write {k} minimal pairs of English sentences for this category: {c.description}.\n"
        "Rules:\n"
        "- \"clean\" is a natural English sentence of 5 to 20 words; \"corrupt\" is the same sentence with exactly "
        "ONE word replaced, as the category says.\n"
        "- Keep every other character identical: same words, punctuation and capitalisation.\n"
        "- The changed word should be short and common (so a language-model tokenizer keeps it as one token); "
        "avoid names and rare words at the changed place.\n"
        "- Never change the first word; put the change in the middle of the sentence more often than at the end.\n"
        f"- Vary subjects, verbs, sentence length and where the change sits. Topic for this batch: {topic}.\n"
        "- clean_word and corrupt_word are the changed word as it appears in each sentence.\n"
        + ("- \"twin\" is the clean sentence with the SAME word replaced by another word that keeps it correct "
           "(twin_word); twin_kind is \"neutral\" if the meaning stays the same (a synonym or spelling variant), "
           "else \"acceptable\".\n"
           "- detect_word is the word of the corrupt sentence where the error first becomes detectable (often the "
           "changed word itself; for 'an' before a consonant it is the next word).\n"
           if is_error_category(category) else
           "- This category is not an error: leave twin, twin_word, twin_kind and detect_word empty.\n")
        + f"Examples (do not repeat them):\n{examples}\n"
        'Answer with JSON only: {"pairs": [{"clean": "...", "corrupt": "...", "clean_word": "...", '
        '"corrupt_word": "...", "twin": "...", "twin_word": "...", "twin_kind": "...", "detect_word": "..."}]}'
    )
    return [
        {"role": "system", "content": "You write minimal pairs of English sentences for linguistics research. "
                                      "You answer with JSON only."},
        {"role": "user", "content": user},
    ]


# ------------------------------------------------------------------------ resume file


def read_existing(path: Path, tokenizer, *, prepend_bos: bool, max_len: int | None) -> tuple[list[MinimalPair], bool]:
    """Pairs already in ``path``, each re-checked under ``tokenizer``; drops (and reports) a torn last line."""
    if not path.exists():
        return [], False
    if path.is_dir():
        raise PairFileError(path, "is a folder; --out needs a file name")
    raw = path.read_bytes()
    dropped = False
    if raw and not raw.endswith(b"\n"):
        last_nl = raw.rfind(b"\n")
        tail = raw[last_nl + 1:]
        try:
            json.loads(tail.decode("utf-8-sig"))  # -sig: a one-line file may start with a byte-order mark
            complete_tail = True
        except (UnicodeDecodeError, json.JSONDecodeError):
            complete_tail = False
        if complete_tail:
            with open(path, "ab") as fh:  # a whole record without its newline: keep it, end the line
                fh.write(b"\n")
            raw += b"\n"
        else:
            # Only our own interrupted append leaves a partial last line: cut it off.
            os.truncate(path, last_nl + 1)
            raw = raw[: last_nl + 1]
            dropped = True
    try:
        text = raw.decode("utf-8-sig")  # tolerate a byte-order mark, as eclens.pairs.load_jsonl does
    except UnicodeDecodeError as e:
        raise PairFileError(path, "not UTF-8; use a new --out file", raw[: e.start].count(b"\n") + 1) from None
    pairs: list[MinimalPair] = []
    seen_ids: dict[str, int] = {}
    def bad_json(e: json.JSONDecodeError) -> str:
        return (f"invalid JSON ({e.msg}, column {e.colno}) in the file to resume; fix or delete that line, or use "
                "a new --out file")

    for i, _, rec in iter_jsonl(path, text, bad_json):
        p = pair_from_record(rec, path, i, {"source": SOURCE})
        if p.id in seen_ids:
            raise PairFileError(path, f"duplicate pair id {p.id!r} (first at line {seen_ids[p.id]}); remove the "
                                "repeat or use a new --out file", i)
        seen_ids[p.id] = i
        a = align(p, tokenizer, prepend_bos=prepend_bos, max_len=max_len)
        if not isinstance(a, AlignedPair):
            raise PairFileError(path, f"pair {p.id!r} is not a single-token change under this tokenizer "
                                f"({a.label}); was the file made for another --model? Use a new --out file", i)
        pairs.append(p)
    return pairs, dropped


def _append(fd: int, pairs: Sequence[MinimalPair]) -> None:
    data = "".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in pairs).encode("utf-8")
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    os.fsync(fd)


# ----------------------------------------------------------------------------- requests


@dataclass
class _Result:
    category: str
    k: int
    content: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    error: str | None = None  # set when the request failed for good (after retries)


class _Fatal(Exception):
    """A failure no retry can fix (bad key, unknown model, refused request)."""


class _Requester:
    """Sends one chat request with retries; shared by the worker threads."""

    def __init__(self, client, cfg: LLMConfig, redact: Callable[[str], str]):
        self.client = client
        self.cfg = cfg
        self.redact = redact
        self.lock = threading.Lock()
        self.mode = "json_schema" if cfg.structured == "auto" else cfg.structured
        self.rng = random.Random(cfg.seed)

    def _downgrade(self, failed_mode: str) -> bool:
        """After a server refuses a response format, use the next plainer one (``auto`` only)."""
        if self.cfg.structured != "auto":
            return False
        with self.lock:
            if self.mode != failed_mode:  # another thread downgraded already
                return True
            i = STRUCTURED_MODES.index(failed_mode)
            if i + 1 >= len(STRUCTURED_MODES):
                return False
            self.mode = STRUCTURED_MODES[i + 1]
            return True

    def _wait(self, attempt: int, err) -> None:
        delay = None
        headers = getattr(getattr(err, "response", None), "headers", None)
        if headers is not None:
            for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
                try:
                    v = float(headers.get(name)) * scale
                except (TypeError, ValueError):
                    continue
                if 0 <= v <= self.cfg.retry_max_s:
                    delay = v
                    break
        if delay is None:
            with self.lock:
                jitter = 0.5 + 0.5 * self.rng.random()
            delay = min(self.cfg.retry_max_s, self.cfg.retry_base_s * 2 ** (attempt - 1)) * jitter
        time.sleep(delay)

    def __call__(self, category: str, k: int, topic: str) -> _Result:
        import openai

        res = _Result(category, k)
        messages = build_messages(category, k, topic)
        attempt = 0
        while True:
            mode = self.mode
            kwargs: dict[str, Any] = {"model": self.cfg.model, "messages": messages,
                                      "temperature": self.cfg.temperature}
            if mode == "json_schema":
                kwargs["response_format"] = {"type": "json_schema", "json_schema": {
                    "name": "minimal_pairs", "strict": True, "schema": PAIR_SCHEMA}}
            elif mode == "json_object":
                kwargs["response_format"] = {"type": "json_object"}
            try:
                resp = self.client.chat.completions.create(**kwargs)
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as e:
                # APITimeoutError is an APIConnectionError
                attempt += 1
                if attempt > self.cfg.max_retries:
                    res.error = _describe(e, self.redact)
                    return res
                res.retries += 1
                self._wait(attempt, e)
                continue
            except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
                if mode != "off" and self._downgrade(mode):
                    continue
                raise _Fatal(self.redact(f"the server refused the request: {_describe(e, self.redact)}")) from None
            except openai.AuthenticationError as e:
                raise _Fatal(self.redact(f"authentication failed ({_describe(e, self.redact)}); check OPENAI_API_KEY "
                                         "(environment or .env)")) from None
            except openai.NotFoundError as e:
                raise _Fatal(self.redact(f"not found ({_describe(e, self.redact)}); check --llm-model "
                                         f"{self.cfg.model!r} and --base-url")) from None
            except openai.APIStatusError as e:
                raise _Fatal(self.redact(f"the server answered {_describe(e, self.redact)}")) from None
            except openai.OpenAIError as e:
                raise _Fatal(self.redact(f"the OpenAI client failed: {type(e).__name__}: {e}")) from None
            usage = getattr(resp, "usage", None)
            res.prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
            res.completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
            choices = getattr(resp, "choices", None) or []
            content = choices[0].message.content if choices and choices[0].message else None
            # A server (or proxy) that echoes request headers into its answer must not get the key
            # into the pairs file.
            res.content = self.redact(content) if content else content
            return res


def _describe(e, redact: Callable[[str], str] = lambda s: s) -> str:
    status = getattr(e, "status_code", None)
    # Redact before shortening: a key cut in half by the shortening would no longer match.
    msg = redact(str(getattr(e, "message", None) or e))
    msg = " ".join(msg.split())[:300]
    return f"{status} {msg}" if status else f"{type(e).__name__}: {msg}"


# ------------------------------------------------------------------------------- driver


def generate_openai(
    out: str | os.PathLike,
    tokenizer,
    config: LLMConfig,
    *,
    api_key: str | None = None,
    prepend_bos: bool = False,
    max_len: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    client=None,
) -> GenReport:
    """Fill ``out`` (JSONL, appended to and resumed) with ``config.n_per_category`` valid pairs per category.

    ``tokenizer``/``prepend_bos``/``max_len`` are the *target* model's: every pair is
    kept only if it is a single-token change there (and not at the first token).
    ``progress(category, have, target)`` is called on the main thread as pairs arrive.
    Writes a report next to ``out`` (``<stem>.report.json``) and returns it; a
    failure no retry can fix raises :class:`EclensError` after saving what was done.
    """
    cfg = config
    if cfg.n_per_category < 1:
        raise EclensError(f"--n must be at least 1, got {cfg.n_per_category}")
    if cfg.pairs_per_request < 1 or cfg.concurrency < 1 or cfg.max_retries < 0:
        raise EclensError("--pairs-per-request and --concurrency must be at least 1, --max-retries at least 0")
    if cfg.structured not in ("auto", *STRUCTURED_MODES):
        raise EclensError(f"unknown --structured {cfg.structured!r}: use auto, {', '.join(STRUCTURED_MODES)}")
    cats = resolve_categories(list(cfg.categories) if cfg.categories else None)
    path = Path(out)
    t0 = time.perf_counter()
    existing, dropped = read_existing(path, tokenizer, prepend_bos=prepend_bos, max_len=max_len)
    stats = {c: CategoryStats(c, target=cfg.n_per_category) for c in cats}
    seen: set[tuple[str, str]] = set()
    other = 0
    for p in existing:
        seen.add((p.clean, p.corrupt))
        if p.is_twin:  # twins come with their error pair; the target counts pairs
            continue
        if p.category in stats:
            stats[p.category].existing += 1
        else:
            other += 1
    report = GenReport(path, cfg.model, safe_url(cfg.base_url), stats, cfg.structured, dropped_partial_line=dropped,
                       other_pairs=other)
    need_requests = sum(math.ceil(s.missing / cfg.pairs_per_request) for s in stats.values())
    report.budget = cfg.max_requests if cfg.max_requests is not None else 3 * need_requests + 2 * len(cats)
    report_path = path.with_suffix(".report.json") if path.suffix else path.with_name(path.name + ".report.json")
    if report.complete:
        report.seconds = time.perf_counter() - t0
        write_json(report_path, report.to_dict())
        return report

    key = resolve_api_key(api_key)
    if not key:
        if not cfg.base_url:
            raise EclensError("no API key: set OPENAI_API_KEY or put OPENAI_API_KEY=... in a .env file "
                              "(or give --base-url for a local server that needs none)")
        key = "no-key"  # local servers (vLLM, llama.cpp, Ollama) accept any key
    redact = _redactor(key)
    if client is None:
        from openai import OpenAI

        client = OpenAI(api_key=key, base_url=cfg.base_url, max_retries=0, timeout=cfg.timeout_s)
    requester = _Requester(client, cfg, redact)
    if progress:
        for c, s in stats.items():
            progress(c, s.have, s.target)

    topic_rng = random.Random(f"{cfg.seed}\x1f{len(existing)}")
    topics = {c: topic_rng.sample(TOPICS, len(TOPICS)) for c in cats}
    inflight: dict[Future, str] = {}
    inflight_n: Counter = Counter()
    consecutive_failures = 0
    fatal: str | None = None
    fd: int | None = None  # opened at the first valid pair, so a run that makes none leaves no file
    pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="eclens-llm")
    try:
        while True:
            # Keep the pool busy, round-robin over categories, without asking for far more than a
            # category still misses (estimated from the valid share of what it returned so far).
            submitted = True
            while submitted and fatal is None and len(inflight) < cfg.concurrency and report.requests < report.budget:
                submitted = False
                for c, s in stats.items():
                    if len(inflight) >= cfg.concurrency or report.requests >= report.budget:
                        break
                    if s.missing == 0:
                        continue
                    rate = max(0.2, s.valid / s.returned) if s.returned else 0.5
                    if inflight_n[c] * cfg.pairs_per_request * rate >= s.missing:
                        continue
                    topic = topics[c][s.requests % len(TOPICS)]
                    s.requests += 1
                    report.requests += 1
                    s.requested += cfg.pairs_per_request
                    inflight[pool.submit(requester, c, cfg.pairs_per_request, topic)] = c
                    inflight_n[c] += 1
                    submitted = True
            if not inflight:
                break
            done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            for fut in done:
                c = inflight.pop(fut)
                inflight_n[c] -= 1
                try:
                    res = fut.result()
                except _Fatal as e:
                    fatal = fatal or str(e)
                    continue
                s = stats[c]
                s.retries += res.retries
                s.prompt_tokens += res.prompt_tokens
                s.completion_tokens += res.completion_tokens
                if res.error is not None:
                    s.failed_requests += 1
                    consecutive_failures += 1
                    if consecutive_failures >= max(3, cfg.concurrency):
                        fatal = fatal or (f"{consecutive_failures} requests in a row failed after "
                                          f"{cfg.max_retries} retries each; last: {res.error}")
                    continue
                consecutive_failures = 0
                new = _validate(res, s, seen, tokenizer, cfg.model, prepend_bos, max_len)
                if new:
                    if fd is None:
                        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                    _append(fd, new)
                if progress:
                    progress(c, s.have, s.target)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)
        report.structured = requester.mode  # the response format the server ended up accepting
        report.seconds = time.perf_counter() - t0
        write_json(report_path, report.to_dict())
    pool.shutdown(wait=True)
    if fatal is not None:
        raise EclensError(f"{safe_url(cfg.base_url) or 'api.openai.com'}: {redact(fatal)} "
                          f"({sum(s.valid for s in stats.values())} new pairs saved in {path}; rerun to resume)")
    return report


def _validate(res: _Result, s: CategoryStats, seen: set, tokenizer, model: str, prepend_bos: bool,
              max_len: int | None) -> list[MinimalPair]:
    items = parse_pairs(res.content)
    if not items:
        s.bad_responses += 1
        return []
    s.returned += len(items)
    new: list[MinimalPair] = []
    for item in items:
        got = item_sentences(item)
        if got is None:
            s.rejected["malformed"] += 1
            continue
        clean, corrupt, words = got
        if (clean, corrupt) in seen:
            s.rejected["duplicate"] += 1
            continue
        twin_text, twin_kind = words.pop("twin", None), words.pop("twin_kind", None)
        twin_word, detect_word = words.pop("twin_word", None), words.pop("detect_word", None)
        pid = pair_id(clean, corrupt, s.category)
        error = is_error_category(s.category)
        pair = MinimalPair(pid, clean, corrupt, s.category, SOURCE, {"generator": model, **words},
                           cluster=pid if error else None, role="error" if error else None)
        a = align(pair, tokenizer, prepend_bos=prepend_bos, max_len=max_len)
        if not isinstance(a, AlignedPair):
            s.rejected[a.reason] += 1
            continue
        if a.position < 1 + int(prepend_bos):
            s.rejected["first_token"] += 1
            continue
        pair.detect = detect_index(corrupt, detect_word, a, tokenizer, prepend_bos)
        twin = None
        if error and twin_text:
            # The twin must change the same token of the same clean sentence, and stay a valid pair.
            twin = MinimalPair(pair_id(clean, twin_text, s.category), clean, twin_text, s.category, SOURCE,
                               {"generator": model, "clean_word": words.get("clean_word", ""),
                                "corrupt_word": twin_word or ""}, cluster=pid, role="twin",
                               twin_kind=twin_kind if twin_kind in ("neutral", "acceptable") else "acceptable",
                               twin_of=pid)
            t = align(twin, tokenizer, prepend_bos=prepend_bos, max_len=max_len)
            if not isinstance(t, AlignedPair) or t.position != a.position or (clean, twin_text) in seen:
                s.rejected["twin"] += 1
                continue
        seen.add((clean, corrupt))
        if s.missing == 0:
            s.surplus += 1
            continue
        s.valid += 1
        new.append(pair)
        if twin is not None:
            seen.add((clean, twin.corrupt))
            s.twins += 1
            new.append(twin)
    return new


def detect_index(corrupt: str, word: str | None, a: AlignedPair, tokenizer, prepend_bos: bool) -> int | None:
    """The word index of ``word`` in ``corrupt`` at or after the changed token, or None (not given, not found,
    or the changed word itself, which ``p`` already marks)."""
    if not word:
        return None
    from ..spans import char_token, word_starts

    target = word.strip().strip(".,;:!?\"'").lower()
    for i, start in enumerate(word_starts(corrupt)):
        w = corrupt[start:].split()[0].strip(".,;:!?\"'").lower()
        if w == target and char_token(tokenizer, corrupt, start, prepend_bos) > a.position:
            return i
    return None
