"""A real HTTP server speaking OpenAI's ``/v1/chat/completions`` for testing the LLM generator.

It runs on 127.0.0.1 on an ephemeral port (stdlib ``http.server`` in a thread) and
answers each request with a *behaviour*: taken from ``script`` in order, then
``default``. Behaviours:

- ``valid``: the requested number of distinct pairs that are single-token changes
  under SmolLM2's tokenizer (common words only);
- ``invalid``: pairs that differ in two words, differ in length, or are identical;
- ``mixed``: two new valid pairs, one repeat of an earlier pair, one invalid pair
  and one item that is not a pair at all;
- ``fenced``: valid pairs as a bare list in a Markdown code fence after some chatter,
  with the keys ``sentence_good``/``sentence_bad``;
- ``malformed``: text that is not JSON;
- ``429`` / ``500`` / ``401``: that HTTP error (429 carries ``retry-after-ms``).

With ``require_key`` set, requests with another bearer token get a 401 whose body
echoes the Authorization header back (a careless server), so tests can check the
client side never repeats it. With ``reject_schema`` set, requests that ask for a
``json_schema`` response format get a 400, as older servers do.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SUBJECTS = ("The cat", "My dog", "The old man", "Her sister", "The teacher", "Our neighbor", "The young girl",
            "His friend")
VERBS = ("saw", "liked", "found", "wanted", "painted", "cleaned", "moved", "sold")
NOUNS = ("car", "house", "box", "chair", "bike", "door", "lamp", "table")
PLACES = ("park", "river", "school", "station", "market", "bridge")
# One adjective swap per category, so no two categories ever produce the same pair.
SWAPS = (("red", "blue"), ("big", "small"), ("old", "new"), ("hot", "cold"), ("long", "short"), ("dark", "bright"),
         ("cheap", "nice"), ("happy", "sad"), ("fast", "slow"), ("green", "black"))
# The twin word of each category's swap (an acceptable change of the same slot), used by no swap.
TWINS = ("white", "large", "young", "warm", "tall", "light", "fine", "quiet", "quick", "brown")


def pair_for(category_index: int, i: int, twins: bool = False) -> dict[str, str]:
    """The ``i``-th valid pair of a category: distinct for every (category, i) up to 3072."""
    s = SUBJECTS[i % 8]
    v = VERBS[(i // 8) % 8]
    n = NOUNS[(i // 64) % 8]
    p = PLACES[(i // 512) % 6]
    a, b = SWAPS[category_index % len(SWAPS)]
    t = TWINS[category_index % len(TWINS)]
    frame = f"{s} {v} the {{}} {n} near the {p} today."
    out = {"clean": frame.format(a), "corrupt": frame.format(b), "clean_word": a, "corrupt_word": b}
    if twins:  # the full structure: a twin of the same slot and the word where the change shows
        out.update(twin=frame.format(t), twin_word=t, twin_kind="acceptable", detect_word=n)
    return out


class LLMServer:
    def __init__(self, *, require_key: str | None = None, delay: float = 0.0):
        self.script: list[str] = []
        self.default = "valid"
        self.require_key = require_key
        self.reject_schema = False
        self.twins = False  # answer with twins and detect words (the full structure)
        self.delay = delay
        self.lock = threading.Lock()
        self.requests: list[dict] = []  # body and the behaviour used, per request
        self.counters: dict[str, int] = {}
        self.categories: dict[str, int] = {}
        self._httpd: ThreadingHTTPServer | None = None

    # -- control
    def reset_counters(self) -> None:
        """Start every category's pairs from the first again (to make the client see repeats)."""
        with self.lock:
            self.counters.clear()

    def start(self) -> LLMServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                status, headers, payload = server.handle(self.path, dict(self.headers), body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def base_url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    @property
    def behaviours(self) -> list[str]:
        return [r["behaviour"] for r in self.requests]

    # -- protocol
    def handle(self, path: str, headers: dict, raw: bytes):
        if not path.rstrip("/").endswith("/chat/completions"):
            return 404, {}, {"error": {"message": f"no route {path}", "type": "not_found"}}
        body = json.loads(raw or b"{}")
        auth = headers.get("Authorization") or headers.get("authorization") or ""
        with self.lock:
            behaviour = self.script.pop(0) if self.script else self.default
            if self.require_key is not None and auth != f"Bearer {self.require_key}":
                behaviour = "401"
            fmt = (body.get("response_format") or {}).get("type")
            if self.reject_schema and fmt == "json_schema":
                behaviour = "400_schema"
            self.requests.append({"body": body, "behaviour": behaviour, "response_format": fmt})
        if self.delay:
            time.sleep(self.delay)
        if behaviour == "401":
            return 401, {}, {"error": {"message": f"invalid key in header {auth!r}", "type": "invalid_request_error"}}
        if behaviour == "400_schema":
            return 400, {}, {"error": {"message": "response_format json_schema is not supported",
                                       "type": "invalid_request_error"}}
        if behaviour == "429":
            return 429, {"retry-after-ms": "20"}, {"error": {"message": "rate limited", "type": "rate_limit"}}
        if behaviour == "500":
            return 500, {}, {"error": {"message": "server exploded", "type": "server_error"}}
        prompt = "\n".join(m.get("content", "") for m in body.get("messages", []))
        m = re.search(r"Category: (\S+)", prompt)
        category = m.group(1) if m else "unknown"
        k = int(re.search(r"Write (\d+) minimal pairs", prompt).group(1)) if "minimal pairs" in prompt else 5
        content = self._content(behaviour, category, k)
        return 200, {}, {
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "test"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(content) // 4,
                      "total_tokens": len(prompt) // 4 + len(content) // 4},
        }

    def _next(self, category: str, k: int) -> list[dict]:
        with self.lock:
            ci = self.categories.setdefault(category, len(self.categories))
            start = self.counters.get(category, 0)
            self.counters[category] = start + k
        return [pair_for(ci, i, self.twins) for i in range(start, start + k)]

    def _content(self, behaviour: str, category: str, k: int) -> str:
        if behaviour == "malformed":
            return "Sure! Here are some pairs: {clean: The cat sat, corrupt: The cat sit"
        if behaviour == "fenced":
            items = [{"sentence_good": p["clean"], "sentence_bad": p["corrupt"]} for p in self._next(category, k)]
            return "Here you go:\n```json\n" + json.dumps(items, indent=1) + "\n```\nHope this helps!"
        if behaviour == "invalid":
            items = []
            for i, p in enumerate(self._next(category, k)):
                kind = i % 3
                if kind == 0:  # two words changed
                    items.append({"clean": p["clean"], "corrupt": p["corrupt"].replace("today", "tonight")})
                elif kind == 1:  # one word becomes two
                    items.append({"clean": p["clean"], "corrupt": p["clean"].replace(" the ", " the very ", 1)})
                else:
                    items.append({"clean": p["clean"], "corrupt": p["clean"]})
            return json.dumps({"pairs": items})
        if behaviour == "mixed":
            new = self._next(category, 3)
            items = new[:2] + [new[0], {"clean": new[2]["clean"], "corrupt": new[2]["corrupt"].replace("today", "now")},
                               {"sentence": "not a pair"}]
            return json.dumps({"pairs": items})
        return json.dumps({"pairs": self._next(category, k)})
