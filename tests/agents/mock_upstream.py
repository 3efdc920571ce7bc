#!/usr/bin/env python3
"""A validating mock LLM upstream for scripts/agents-e2e (Python stdlib only).

Speaks the real wire formats of
  Anthropic  POST /v1/messages (SSE and JSON), POST /v1/messages/count_tokens, GET /v1/models
  OpenAI     POST /v1/responses (SSE and JSON), POST /v1/responses/input_tokens,
             POST /v1/chat/completions (SSE and JSON), GET /v1/models
and validates each chat request the way the real APIs do, answering 400 in the API's own error
shape (and logging the rejection) when a conversation is malformed: tool results without their
call, calls without their results, roles out of order, more than 4 cache_control breakpoints,
thinking blocks whose signature the mock did not issue for that exact text, reasoning items
whose encrypted_content the mock did not issue byte for byte, or a reasoning item with no
following item.

It scripts a tool loop: while the conversation's newest tool result is the answer to fewer than
--tool-results calls, it answers with one more call that makes the agent read a large file
(--files-dir/big-NN.txt), then a final text holding --marker.

Every request (path, headers without credentials, body) and every answer goes to --log as one
JSON line. The listening port is written to --port-file.
"""

import argparse
import base64
import gzip
import hashlib
import hmac
import json
import os
import re
import secrets
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ARGS = None
LOG_LOCK = threading.Lock()
STATE_LOCK = threading.Lock()
HMAC_KEY = secrets.token_bytes(32)
# encrypted_content values issued (Responses), by value -> reasoning item id.
ISSUED_REASONING = {}
# Responses stored by id (for previous_response_id): the full item list after the answer.
STORED_RESPONSES = {}
# Overflow injected once per (dialect, session).
OVERFLOW_DONE = set()

SECRET_HEADER = re.compile(r"(authorization|api[-_]?key|cookie|token|secret|auth)", re.I)
CALL_ID = re.compile(r"e2e(\d{2})x")


def log(entry):
    entry["ts"] = time.time()
    line = json.dumps(entry, ensure_ascii=False)
    with LOG_LOCK:
        with open(ARGS.log, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def thinking_signature(text, nonce=None):
    """An opaque signature bound to the exact thinking text (and a nonce, so that empty
    thinking, as sent with display "omitted", still gets a unique signature)."""
    nonce = nonce if nonce is not None else secrets.token_bytes(12)
    mac = hmac.new(HMAC_KEY, nonce + text.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(b"e2e1" + nonce + mac).decode()


def signature_ok(text, sig):
    try:
        raw = base64.b64decode(sig or "", validate=True)
    except Exception:  # noqa: BLE001
        return False
    if len(raw) != 4 + 12 + 32 or not raw.startswith(b"e2e1"):
        return False
    return hmac.compare_digest(thinking_signature(text, raw[4:16]), sig)


def estimate_tokens(obj):
    return max(1, len(json.dumps(obj, ensure_ascii=False)) // 4)


def file_for(step):
    return os.path.join(ARGS.files_dir, "big-%02d.txt" % step)


def new_call_id(prefix, step):
    return "%s_e2e%02dx%s" % (prefix, step, secrets.token_hex(6))


SUMMARY_PROMPT_START = "You keep the running summary of a long conversation"


def is_summary_request(body):
    """Whether a request is ctxgate's summary call (its default instructions)."""
    system = body.get("system")
    if isinstance(system, str) and system.startswith(SUMMARY_PROMPT_START):
        return True
    msgs = body.get("messages") or []
    first = msgs[0] if msgs and isinstance(msgs[0], dict) else {}
    return first.get("role") == "system" and str(first.get("content", "")).startswith(SUMMARY_PROMPT_START)


class Reject(Exception):
    def __init__(self, message, param=None, code=None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


# ---------------------------------------------------------------- Anthropic validation


def blocks_of(content):
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return content
    return []


def count_cache_control(body):
    n = 0
    system = body.get("system")
    if isinstance(system, list):
        n += sum(1 for b in system if isinstance(b, dict) and "cache_control" in b)
    for t in body.get("tools") or []:
        if isinstance(t, dict) and "cache_control" in t:
            n += 1
    for m in body.get("messages") or []:
        for b in blocks_of(m.get("content")):
            if isinstance(b, dict) and "cache_control" in b:
                n += 1
            # tool_result content blocks may carry breakpoints too
            if isinstance(b, dict) and b.get("type") == "tool_result":
                for c in blocks_of(b.get("content")):
                    if isinstance(c, dict) and "cache_control" in c:
                        n += 1
    return n


def validate_anthropic(body, beta=""):
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise Reject("messages: at least one message is required")
    first = next((m for m in msgs if m.get("role") != "system"), None)
    if first is None or first.get("role") != "user":
        # (A leading mid-conversation system turn is let pass: whether the API accepts one is
        # not known; the first user/assistant message must be a user message.)
        raise Reject("messages: first message must use the \"user\" role")
    n = count_cache_control(body)
    if n > 4:
        raise Reject("A maximum of 4 blocks with cache_control may be provided. Found %d." % n)
    thinking_on = isinstance(body.get("thinking"), dict) and body["thinking"].get("type") in (
        "enabled",
        "adaptive",
    )
    # Claude Code 2.1.3xx sends mid-conversation system turns ({"role": "system"} inside
    # messages, beta per-turn-control-2026-07-01); they take no part in the alternation or in
    # the tool_use/tool_result adjacency below.
    system_ok = "per-turn-control" in beta or "mid-conversation" in beta
    for i, m in enumerate(msgs):
        if m.get("role") == "system" and not system_ok:
            raise Reject("messages.%d.role: Input should be 'user' or 'assistant'" % i)
    idx = [i for i, m in enumerate(msgs) if m.get("role") != "system"]
    prev_role = None
    for pos, i in enumerate(idx):
        m = msgs[i]
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise Reject("messages.%d.role: Input should be 'user' or 'assistant'" % i)
        if role == prev_role:
            # The API merges consecutive same-role turns, but the tool rules below would then
            # be checked on the merged turn; ctxgate must never produce this, so be strict.
            raise Reject(
                "messages.%d: roles must alternate between \"user\" and \"assistant\", "
                "found two consecutive \"%s\" messages" % (i, role)
            )
        prev_role = role
        blocks = blocks_of(m.get("content"))
        if role == "user":
            seen_other = False
            prev_uses = set()
            if pos > 0:
                prev_uses = {
                    b.get("id")
                    for b in blocks_of(msgs[idx[pos - 1]].get("content"))
                    if isinstance(b, dict) and b.get("type") in ("tool_use", "server_tool_use")
                }
            for j, b in enumerate(blocks):
                if not isinstance(b, dict):
                    continue
                if b.get("type") == "tool_result":
                    if seen_other:
                        raise Reject(
                            "messages.%d: `tool_result` blocks must come first in the user "
                            "message content, before any other block" % i
                        )
                    if b.get("tool_use_id") not in prev_uses:
                        raise Reject(
                            "messages.%d.content.%d: unexpected `tool_use_id` found in "
                            "`tool_result` blocks: %s. Each `tool_result` block must have a "
                            "corresponding `tool_use` block in the previous message."
                            % (i, j, b.get("tool_use_id"))
                        )
                else:
                    seen_other = True
        else:
            uses = [
                b.get("id")
                for b in blocks
                if isinstance(b, dict) and b.get("type") == "tool_use"
            ]
            for j, b in enumerate(blocks):
                if isinstance(b, dict) and b.get("type") == "thinking":
                    if not signature_ok(b.get("thinking", ""), b.get("signature")):
                        raise Reject(
                            "messages.%d.content.%d: Invalid `signature` in `thinking` block" % (i, j)
                        )
            if uses:
                nxt = msgs[idx[pos + 1]] if pos + 1 < len(idx) else None
                answered = set()
                if nxt is not None:
                    answered = {
                        b.get("tool_use_id")
                        for b in blocks_of(nxt.get("content"))
                        if isinstance(b, dict) and b.get("type") == "tool_result"
                    }
                missing = [u for u in uses if u not in answered]
                if missing:
                    raise Reject(
                        "messages.%d: `tool_use` ids were found without `tool_result` blocks "
                        "immediately after: %s. Each `tool_use` block must have a corresponding "
                        "`tool_result` block in the next message." % (i, ", ".join(missing))
                    )
    # With thinking on, an assistant turn in the middle of a tool loop must keep its thinking.
    if thinking_on:
        last_asst = None
        for i, m in enumerate(msgs):
            if m.get("role") == "assistant":
                last_asst = i
        if last_asst is not None:
            blocks = [b for b in blocks_of(msgs[last_asst].get("content")) if isinstance(b, dict)]
            has_use = any(b.get("type") == "tool_use" for b in blocks)
            if has_use and blocks and blocks[0].get("type") not in ("thinking", "redacted_thinking"):
                raise Reject(
                    "messages.%d.content.0.type: Expected `thinking` or `redacted_thinking`, but "
                    "found `%s`. When `thinking` is enabled, a final `assistant` message must "
                    "start with a thinking block." % (last_asst, blocks[0].get("type"))
                )


def anthropic_step(body):
    """1 + the step number of the newest answered call the mock issued (0 when none)."""
    step = 0
    for m in body.get("messages") or []:
        for b in blocks_of(m.get("content")):
            if isinstance(b, dict) and b.get("type") == "tool_result":
                mm = CALL_ID.search(str(b.get("tool_use_id", "")))
                if mm:
                    step = max(step, int(mm.group(1)))
    return step


COMPACT_SUMMARY = ("<analysis>The user asked to read files one at a time.</analysis>\n<summary>1. Primary "
                   "Request: read the files the assistant is pointed to, one at a time, then say what was "
                   "read. 2. Progress: some files were read; continue with the next one.</summary>")


def is_compaction_request(body):
    """Claude Code's compaction call: its summary instruction appended to the last user turn."""
    msgs = body.get("messages") or []
    for m in reversed(msgs):
        if m.get("role") != "user":
            continue
        text = " ".join(b.get("text", "") for b in blocks_of(m.get("content")) if isinstance(b, dict))
        return "Respond with TEXT ONLY" in text or "create a detailed summary of the conversation" in text
    return False


def anthropic_plan(body):
    """What to answer: ("tool", name, input, step) or ("text", text, step)."""
    tools = {t.get("name"): t for t in body.get("tools") or [] if isinstance(t, dict)}
    done = anthropic_step(body)
    if is_compaction_request(body):
        return ("text", COMPACT_SUMMARY, done)
    if "Read" in tools or "Bash" in tools:
        if done < ARGS.tool_results:
            step = done + 1
            path = file_for(step)
            if "Read" in tools:
                return ("tool", "Read", {"file_path": path}, step)
            return ("tool", "Bash", {"command": "cat " + path, "description": "Read a file"}, step)
        return ("text", "%s: read %d files." % (ARGS.marker, done), done)
    return ("text", "OK", done)


# ---------------------------------------------------------------- Responses validation


def responses_items(body):
    inp = body.get("input")
    if isinstance(inp, str):
        items = [{"type": "message", "role": "user", "content": inp}]
    elif isinstance(inp, list):
        items = inp
    else:
        items = []
    prev = body.get("previous_response_id")
    if prev:
        with STATE_LOCK:
            stored = STORED_RESPONSES.get(prev)
        if stored is None:
            raise Reject("Previous response with id '%s' not found." % prev, "previous_response_id")
        items = stored + items
    return items


CALL_TYPES = {"function_call": "function_call_output", "custom_tool_call": "custom_tool_call_output",
              "local_shell_call": "local_shell_call_output"}
OUTPUT_TYPES = {v: k for k, v in CALL_TYPES.items()}


def validate_responses(body):
    items = responses_items(body)
    calls = {}
    outputs = set()
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            raise Reject("Invalid type for 'input[%d]'" % i, "input[%d]" % i)
        t = it.get("type", "message")
        if t in CALL_TYPES:
            calls[it.get("call_id")] = i
        elif t in OUTPUT_TYPES:
            cid = it.get("call_id")
            if cid not in calls:
                raise Reject(
                    "No tool call found for %s with call_id %s." % (t, cid), "input"
                )
            outputs.add(cid)
        elif t == "reasoning":
            enc = it.get("encrypted_content")
            if enc is not None:
                with STATE_LOCK:
                    ok = enc in ISSUED_REASONING
                if not ok:
                    raise Reject(
                        "The encrypted content for item %s could not be verified." % it.get("id"),
                        "input",
                        "invalid_encrypted_content",
                    )
            elif body.get("store") is False:
                raise Reject(
                    "Item with id '%s' not found. Items are not persisted when `store` is set to "
                    "false. Try again with `store` set to true, or remove this item from your "
                    "input." % it.get("id"),
                    "input",
                )
            if i + 1 >= len(items):
                raise Reject(
                    "Item '%s' of type 'reasoning' was provided without its required following "
                    "item." % it.get("id"),
                    "input",
                )
    for cid in calls:
        if cid not in outputs:
            raise Reject("No tool output found for function call %s." % cid, "input")


def responses_step(items):
    step = 0
    for it in items:
        if isinstance(it, dict) and it.get("type") in OUTPUT_TYPES:
            mm = CALL_ID.search(str(it.get("call_id", "")))
            if mm:
                step = max(step, int(mm.group(1)))
    return step


def tool_names_responses(body):
    names = {}
    for t in body.get("tools") or []:
        if not isinstance(t, dict):
            continue
        if t.get("type") == "function":
            # Responses tools are flat; chat completions tools nest under "function".
            fn = t.get("function") if isinstance(t.get("function"), dict) else t
            names[fn.get("name")] = fn
        elif t.get("type"):
            names[t.get("name") or t.get("type")] = t
    return names


def shell_args(name, path):
    cmd = "cat " + path
    if name == "exec_command":
        # Codex caps a command's output at 10000 tokens unless the call asks for more.
        return {"cmd": cmd, "max_output_tokens": 20000}
    if name == "shell_command":
        return {"command": cmd}
    if name in ("shell", "container.exec"):
        return {"command": ["bash", "-lc", cmd]}
    if name == "read_file":
        return {"path": path}
    return None


TOOL_PREFERENCE = ["read_file", "exec_command", "shell_command", "shell"]


def openai_plan(tools, done):
    for name in TOOL_PREFERENCE:
        if name in tools:
            if done < ARGS.tool_results:
                step = done + 1
                return ("tool", name, shell_args(name, file_for(step)), step)
            return ("text", "%s: read %d files." % (ARGS.marker, done), done)
    return ("text", "OK", done)


# ---------------------------------------------------------------- chat completions validation


def validate_chat(body):
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise Reject("[] is too short - 'messages'", "messages")
    for i, m in enumerate(msgs):
        if m.get("role") == "tool":
            j = i - 1
            while j >= 0 and msgs[j].get("role") == "tool":
                j -= 1
            ids = set()
            if j >= 0 and msgs[j].get("role") == "assistant":
                ids = {c.get("id") for c in msgs[j].get("tool_calls") or []}
            if m.get("tool_call_id") not in ids:
                raise Reject(
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceeding message with 'tool_calls'.",
                    "messages.[%d].role" % i,
                )
        if m.get("role") == "assistant" and m.get("tool_calls"):
            answered = set()
            k = i + 1
            while k < len(msgs) and msgs[k].get("role") == "tool":
                answered.add(msgs[k].get("tool_call_id"))
                k += 1
            missing = [c.get("id") for c in m["tool_calls"] if c.get("id") not in answered]
            if missing:
                raise Reject(
                    "An assistant message with 'tool_calls' must be followed by tool messages "
                    "responding to each 'tool_call_id'. The following tool_call_ids did not have "
                    "response messages: %s" % ", ".join(missing),
                    "messages.[%d].role" % i,
                )


def chat_step(body):
    step = 0
    for m in body.get("messages") or []:
        if m.get("role") == "tool":
            mm = CALL_ID.search(str(m.get("tool_call_id", "")))
            if mm:
                step = max(step, int(mm.group(1)))
    return step


# ---------------------------------------------------------------- HTTP


def session_key(headers, body, dialect):
    for h in ("x-claude-code-session-id", "session_id", "session-id", "thread-id", "conversation_id",
              "x-conversation-id"):
        if headers.get(h):
            return h + "=" + headers.get(h)
    if isinstance(body, dict):
        if body.get("prompt_cache_key"):
            return "prompt_cache_key=" + str(body["prompt_cache_key"])
        md = body.get("metadata")
        if isinstance(md, dict) and md.get("user_id"):
            return "metadata.user_id=" + str(md["user_id"])
    return dialect + ":anonymous"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mock-upstream/1"

    def log_message(self, fmt, *args):  # quiet
        pass

    # -- plumbing

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    break
                data += self.rfile.read(size)
                self.rfile.readline()
            raw = data
        else:
            raw = self.rfile.read(n) if n else b""
        enc = (self.headers.get("Content-Encoding") or "").lower()
        if enc == "gzip":
            raw = gzip.decompress(raw)
        elif enc == "deflate":
            raw = zlib.decompress(raw)
        elif enc:
            raise Reject("unsupported request Content-Encoding: " + enc)
        return raw

    def wants_gzip(self):
        ae = (self.headers.get("Accept-Encoding") or "").lower()
        return "gzip" in [p.split(";")[0].strip() for p in ae.split(",")] and not ARGS.no_gzip

    def send_json(self, status, obj, extra_headers=None):
        data = json.dumps(obj).encode()
        gz = self.wants_gzip()
        if gz:
            data = gzip.compress(data)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if gz:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", "req_mock" + secrets.token_hex(8))
        for k, v in (extra_headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def start_sse(self):
        self.gz = zlib.compressobj(6, zlib.DEFLATED, 31) if self.wants_gzip() else None
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("request-id", "req_mock" + secrets.token_hex(8))
        if self.gz:
            self.send_header("Content-Encoding", "gzip")
        self.end_headers()

    def chunk(self, data):
        if self.gz is not None:
            data = self.gz.compress(data) + self.gz.flush(zlib.Z_SYNC_FLUSH)
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def sse(self, event, obj):
        line = b""
        if event:
            line += b"event: " + event.encode() + b"\n"
        line += b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
        self.chunk(line)

    def end_sse(self):
        if self.gz is not None:
            tail = self.gz.flush(zlib.Z_FINISH)
            if tail:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(tail), tail))
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def headers_for_log(self):
        out = {}
        for k, v in self.headers.items():
            lk = k.lower()
            if SECRET_HEADER.search(lk) and lk not in ("x-claude-code-session-id",):
                out[lk] = "<redacted>"
            else:
                out[lk] = v
        return out

    # -- dispatch

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        path = self.path.split("?")[0]
        entry = {"kind": "request", "method": "GET", "path": self.path, "headers": self.headers_for_log()}
        log(entry)
        if path.endswith("/models"):
            if "anthropic-version" in {k.lower() for k in self.headers.keys()}:
                obj = {"data": [{"type": "model", "id": "claude-sonnet-4-5", "display_name": "Claude Sonnet 4.5",
                                  "created_at": "2025-09-29T00:00:00Z"}],
                       "has_more": False, "first_id": "claude-sonnet-4-5", "last_id": "claude-sonnet-4-5"}
            else:
                obj = {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "openai"}
                                                  for m in ("gpt-5-codex", "gpt-5", "gpt-4.1")]}
            self.send_json(200, obj)
            log({"kind": "answer", "path": self.path, "status": 200})
            return
        self.send_json(404, {"error": {"message": "not found: " + path, "type": "invalid_request_error",
                                       "param": None, "code": "not_found"}})
        log({"kind": "answer", "path": self.path, "status": 404, "unknown": True})

    def do_POST(self):
        path = self.path.split("?")[0]
        dialect = "anthropic" if "/messages" in path else "openai"
        entry = {"kind": "request", "method": "POST", "path": self.path, "headers": self.headers_for_log()}
        try:
            raw = self.read_body()
            body = json.loads(raw) if raw else {}
        except Reject as r:
            entry["body_error"] = r.message
            log(entry)
            return self.reject(dialect, r, entry)
        except Exception as e:  # noqa: BLE001
            entry["body_error"] = repr(e)
            log(entry)
            return self.reject(dialect, Reject("invalid JSON body: %r" % e), entry)
        entry["body"] = body
        entry["session"] = session_key({k.lower(): v for k, v in self.headers.items()}, body, dialect)
        log(entry)
        try:
            if path.endswith("/v1/messages/count_tokens"):
                return self.answer(entry, 200, {"input_tokens": estimate_tokens(
                    [body.get("system"), body.get("messages"), body.get("tools")])})
            if path.endswith("/v1/messages"):
                validate_anthropic(body, self.headers.get("anthropic-beta") or "")
                if is_summary_request(body):
                    return self.summary_answer(entry, body, "anthropic")
                return self.anthropic(entry, body)
            if path.endswith("/responses/input_tokens"):
                return self.answer(entry, 200, {"object": "response.input_tokens",
                                                "input_tokens": estimate_tokens([body.get("instructions"),
                                                                                 body.get("input"),
                                                                                 body.get("tools")])})
            if path.endswith("/responses"):
                validate_responses(body)
                return self.answer_responses(entry, body)
            if path.endswith("/chat/completions"):
                validate_chat(body)
                if is_summary_request(body):
                    return self.summary_answer(entry, body, "chat")
                return self.chat(entry, body)
        except Reject as r:
            return self.reject("anthropic" if "/messages" in path else "openai", r, entry)
        self.send_json(404, {"error": {"message": "not found: " + path, "type": "invalid_request_error",
                                       "param": None, "code": "not_found"}})
        log({"kind": "answer", "path": self.path, "status": 404, "unknown": True})

    def summary_answer(self, entry, body, dialect):
        """ctxgate's own summary call ([prune.summary]): a plain text answer, as a small model
        would give, with usage."""
        text = "Summary (mock): the agent read files step by step; %s" % secrets.token_hex(4)
        in_tok = estimate_tokens([body.get("system"), body.get("messages")])
        out_tok = estimate_tokens(text)
        if dialect == "anthropic":
            obj = {"id": "msg_mock" + secrets.token_hex(8), "type": "message", "role": "assistant",
                   "model": body.get("model"), "content": [{"type": "text", "text": text}],
                   "stop_reason": "end_turn", "stop_sequence": None,
                   "usage": {"input_tokens": in_tok, "output_tokens": out_tok,
                             "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}
        else:
            obj = {"id": "chatcmpl-mock" + secrets.token_hex(8), "object": "chat.completion",
                   "created": int(time.time()), "model": body.get("model"),
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                                "finish_reason": "stop", "logprobs": None}],
                   "usage": {"prompt_tokens": in_tok, "completion_tokens": out_tok,
                             "total_tokens": in_tok + out_tok}}
        self.send_json(200, obj)
        log({"kind": "answer", "path": self.path, "status": 200, "session": entry.get("session"),
             "model": body.get("model"), "summary_call": True})

    def answer(self, entry, status, obj):
        self.send_json(status, obj)
        log({"kind": "answer", "path": self.path, "status": status, "session": entry.get("session")})

    def reject(self, dialect, r, entry):
        if dialect == "anthropic":
            obj = {"type": "error", "error": {"type": "invalid_request_error", "message": r.message},
                   "request_id": "req_mock" + secrets.token_hex(8)}
        else:
            obj = {"error": {"message": r.message, "type": "invalid_request_error", "param": r.param,
                             "code": r.code}}
        log({"kind": "answer", "path": self.path, "status": 400, "rejected": r.message,
             "session": entry.get("session"), "model": (entry.get("body") or {}).get("model")})
        self.send_json(400, obj)
        sys.stderr.write("mock upstream: REJECTED %s: %s\n" % (self.path, r.message))

    def overflow_now(self, dialect, entry, step):
        if ARGS.overflow_at <= 0 or step < ARGS.overflow_at:
            return False
        key = (dialect, entry.get("session"))
        with STATE_LOCK:
            if key in OVERFLOW_DONE:
                return False
            OVERFLOW_DONE.add(key)
        return True

    # -- Anthropic

    def anthropic(self, entry, body):
        plan = anthropic_plan(body)
        step = plan[-1]
        if plan[0] == "tool" and self.overflow_now("anthropic", entry, step):
            obj = {"type": "error", "error": {"type": "invalid_request_error",
                                              "message": "prompt is too long: 250000 tokens > 200000 maximum"},
                   "request_id": "req_mock" + secrets.token_hex(8)}
            log({"kind": "answer", "path": self.path, "status": 400, "injected": "overflow",
                 "session": entry.get("session"), "model": body.get("model"), "step": step})
            self.send_json(400, obj)
            return
        thinking_on = isinstance(body.get("thinking"), dict) and body["thinking"].get("type") in ("enabled", "adaptive")
        content = []
        if thinking_on:
            text = "Thinking about step %d (%s)." % (step, secrets.token_hex(4))
            if body["thinking"].get("display") == "omitted":
                text = ""
            content.append({"type": "thinking", "thinking": text, "signature": thinking_signature(text)})
        if plan[0] == "tool":
            content.append({"type": "text", "text": "Reading the next file."})
            content.append({"type": "tool_use", "id": new_call_id("toolu", plan[3]), "name": plan[1],
                            "input": plan[2]})
            stop = "tool_use"
        else:
            content.append({"type": "text", "text": plan[1]})
            stop = "end_turn"
        in_tok = estimate_tokens([body.get("system"), body.get("messages"), body.get("tools")])
        cache_read = in_tok // 2
        usage = {"input_tokens": in_tok - cache_read, "cache_creation_input_tokens": 0,
                 "cache_read_input_tokens": cache_read, "output_tokens": 0}
        out_tok = estimate_tokens(content)
        msg = {"id": "msg_mock" + secrets.token_hex(8), "type": "message", "role": "assistant",
               "model": body.get("model"), "content": content, "stop_reason": stop, "stop_sequence": None,
               "usage": dict(usage, output_tokens=out_tok)}
        summary = {"kind": "answer", "path": self.path, "status": 200, "session": entry.get("session"), "model": body.get("model"),
                   "stream": bool(body.get("stream")), "gzip": self.wants_gzip(), "answer": plan[0],
                   "step": step}
        if plan[0] == "tool":
            summary["tool"] = {"id": content[-1]["id"], "name": plan[1], "input": plan[2]}
        log(summary)
        if not body.get("stream"):
            self.send_json(200, msg)
            return
        self.start_sse()
        start = dict(msg, content=[], stop_reason=None, usage=dict(usage, output_tokens=1))
        self.sse("message_start", {"type": "message_start", "message": start})
        self.sse("ping", {"type": "ping"})
        for idx, b in enumerate(content):
            if b["type"] == "thinking":
                self.sse("content_block_start", {"type": "content_block_start", "index": idx,
                                                 "content_block": {"type": "thinking", "thinking": "", "signature": ""}})
                self.sse("content_block_delta", {"type": "content_block_delta", "index": idx,
                                                 "delta": {"type": "thinking_delta", "thinking": b["thinking"]}})
                self.sse("content_block_delta", {"type": "content_block_delta", "index": idx,
                                                 "delta": {"type": "signature_delta", "signature": b["signature"]}})
            elif b["type"] == "text":
                self.sse("content_block_start", {"type": "content_block_start", "index": idx,
                                                 "content_block": {"type": "text", "text": ""}})
                words = re.findall(r"\S+\s*", b["text"]) or [b["text"]]
                for w in words:
                    self.sse("content_block_delta", {"type": "content_block_delta", "index": idx,
                                                     "delta": {"type": "text_delta", "text": w}})
            else:
                self.sse("content_block_start", {"type": "content_block_start", "index": idx,
                                                 "content_block": {"type": "tool_use", "id": b["id"],
                                                                   "name": b["name"], "input": {}}})
                js = json.dumps(b["input"])
                for k in range(0, len(js), 16):
                    self.sse("content_block_delta", {"type": "content_block_delta", "index": idx,
                                                     "delta": {"type": "input_json_delta", "partial_json": js[k:k + 16]}})
            self.sse("content_block_stop", {"type": "content_block_stop", "index": idx})
        self.sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                   "usage": {"output_tokens": out_tok}})
        self.sse("message_stop", {"type": "message_stop"})
        self.end_sse()

    # -- OpenAI Responses

    def answer_responses(self, entry, body):
        items = responses_items(body)
        tools = tool_names_responses(body)
        plan = openai_plan(tools, responses_step(items))
        step = plan[-1]
        if plan[0] == "tool" and self.overflow_now("responses", entry, step):
            obj = {"error": {"message": "Your input exceeds the context window of this model. Please adjust "
                                        "your input and try again.", "type": "invalid_request_error",
                             "param": "input", "code": "context_length_exceeded"}}
            log({"kind": "answer", "path": self.path, "status": 400, "injected": "overflow",
                 "session": entry.get("session"), "model": body.get("model"), "step": step})
            self.send_json(400, obj)
            return
        rid = "resp_mock" + secrets.token_hex(12)
        output = []
        include = body.get("include") or []
        if "reasoning.encrypted_content" in include:
            enc = "gAAAAB" + base64.urlsafe_b64encode(secrets.token_bytes(48)).decode()
            rs_id = "rs_mock" + secrets.token_hex(12)
            with STATE_LOCK:
                ISSUED_REASONING[enc] = rs_id
            output.append({"id": rs_id, "type": "reasoning", "summary": [], "encrypted_content": enc})
        if plan[0] == "tool":
            output.append({"id": "fc_mock" + secrets.token_hex(12), "type": "function_call", "status": "completed",
                           "call_id": new_call_id("call", plan[3]), "name": plan[1],
                           "arguments": json.dumps(plan[2])})
        else:
            output.append({"id": "msg_mock" + secrets.token_hex(12), "type": "message", "status": "completed",
                           "role": "assistant",
                           "content": [{"type": "output_text", "text": plan[1], "annotations": []}]})
        in_tok = estimate_tokens([body.get("instructions"), items, body.get("tools")])
        cached = (in_tok // 2) // 128 * 128
        out_tok = estimate_tokens(output)
        usage = {"input_tokens": in_tok, "input_tokens_details": {"cached_tokens": cached},
                 "output_tokens": out_tok, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": in_tok + out_tok}
        resp = {"id": rid, "object": "response", "created_at": int(time.time()), "status": "completed",
                "error": None, "incomplete_details": None, "instructions": body.get("instructions"),
                "model": body.get("model"), "output": output, "parallel_tool_calls": True,
                "previous_response_id": body.get("previous_response_id"), "reasoning": body.get("reasoning"),
                "store": body.get("store", True), "temperature": 1.0, "text": {"format": {"type": "text"}},
                "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [], "top_p": 1.0,
                "truncation": "disabled", "usage": usage, "metadata": {}}
        if body.get("store", True) is not False:
            with STATE_LOCK:
                STORED_RESPONSES[rid] = [i for i in items] + output
        summary = {"kind": "answer", "path": self.path, "status": 200, "session": entry.get("session"), "model": body.get("model"),
                   "stream": bool(body.get("stream")), "gzip": self.wants_gzip(), "answer": plan[0],
                   "step": step, "response_id": rid}
        if plan[0] == "tool":
            summary["tool"] = {"id": output[-1]["call_id"], "name": plan[1], "input": plan[2]}
        log(summary)
        if not body.get("stream"):
            self.send_json(200, resp)
            return
        self.start_sse()
        seq = [0]

        def ev(name, obj):
            obj = dict({"type": name}, **obj)
            obj["sequence_number"] = seq[0]
            seq[0] += 1
            self.sse(name, obj)

        in_progress = dict(resp, status="in_progress", output=[], usage=None)
        ev("response.created", {"response": in_progress})
        ev("response.in_progress", {"response": in_progress})
        for oi, item in enumerate(output):
            if item["type"] == "reasoning":
                ev("response.output_item.added", {"output_index": oi, "item": dict(item)})
                ev("response.output_item.done", {"output_index": oi, "item": item})
            elif item["type"] == "function_call":
                ev("response.output_item.added", {"output_index": oi,
                                                  "item": dict(item, status="in_progress", arguments="")})
                a = item["arguments"]
                for k in range(0, len(a), 16):
                    ev("response.function_call_arguments.delta", {"item_id": item["id"], "output_index": oi,
                                                                  "delta": a[k:k + 16]})
                ev("response.function_call_arguments.done", {"item_id": item["id"], "output_index": oi,
                                                             "arguments": a})
                ev("response.output_item.done", {"output_index": oi, "item": item})
            else:
                text = item["content"][0]["text"]
                ev("response.output_item.added", {"output_index": oi,
                                                  "item": dict(item, status="in_progress", content=[])})
                ev("response.content_part.added", {"item_id": item["id"], "output_index": oi, "content_index": 0,
                                                   "part": {"type": "output_text", "text": "", "annotations": []}})
                for w in re.findall(r"\S+\s*", text) or [text]:
                    ev("response.output_text.delta", {"item_id": item["id"], "output_index": oi,
                                                      "content_index": 0, "delta": w, "logprobs": []})
                ev("response.output_text.done", {"item_id": item["id"], "output_index": oi, "content_index": 0,
                                                 "text": text, "logprobs": []})
                ev("response.content_part.done", {"item_id": item["id"], "output_index": oi, "content_index": 0,
                                                  "part": item["content"][0]})
                ev("response.output_item.done", {"output_index": oi, "item": item})
        ev("response.completed", {"response": resp})
        self.end_sse()

    # -- OpenAI chat completions

    def chat(self, entry, body):
        tools = tool_names_responses(body)
        plan = openai_plan(tools, chat_step(body))
        step = plan[-1]
        cid = "chatcmpl-mock" + secrets.token_hex(8)
        created = int(time.time())
        in_tok = estimate_tokens([body.get("messages"), body.get("tools")])
        msg = {"role": "assistant", "content": None, "refusal": None}
        if plan[0] == "tool":
            call = {"id": new_call_id("call", plan[3]), "type": "function",
                    "function": {"name": plan[1], "arguments": json.dumps(plan[2])}}
            msg["tool_calls"] = [call]
            finish = "tool_calls"
        else:
            msg["content"] = plan[1]
            finish = "stop"
        out_tok = estimate_tokens(msg)
        cached = (in_tok // 2) // 128 * 128
        usage = {"prompt_tokens": in_tok, "completion_tokens": out_tok, "total_tokens": in_tok + out_tok,
                 "prompt_tokens_details": {"cached_tokens": cached}}
        summary = {"kind": "answer", "path": self.path, "status": 200, "session": entry.get("session"), "model": body.get("model"),
                   "stream": bool(body.get("stream")), "gzip": self.wants_gzip(), "answer": plan[0], "step": step}
        if plan[0] == "tool":
            summary["tool"] = {"id": msg["tool_calls"][0]["id"], "name": plan[1], "input": plan[2]}
        log(summary)
        if not body.get("stream"):
            self.send_json(200, {"id": cid, "object": "chat.completion", "created": created, "model": body.get("model"),
                                 "choices": [{"index": 0, "message": msg, "finish_reason": finish, "logprobs": None}],
                                 "usage": usage})
            return
        self.start_sse()

        def chunk(delta, finish_reason=None):
            self.sse(None, {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.get("model"),
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]})

        chunk({"role": "assistant", "content": ""})
        if plan[0] == "tool":
            c = msg["tool_calls"][0]
            chunk({"tool_calls": [{"index": 0, "id": c["id"], "type": "function",
                                   "function": {"name": c["function"]["name"], "arguments": ""}}]})
            a = c["function"]["arguments"]
            for k in range(0, len(a), 16):
                chunk({"tool_calls": [{"index": 0, "function": {"arguments": a[k:k + 16]}}]})
        else:
            for w in re.findall(r"\S+\s*", plan[1]) or [plan[1]]:
                chunk({"content": w})
        chunk({}, finish)
        if (body.get("stream_options") or {}).get("include_usage"):
            self.sse(None, {"id": cid, "object": "chat.completion.chunk", "created": created,
                            "model": body.get("model"), "choices": [], "usage": usage})
        self.sse(None, b"[DONE]")
        self.end_sse()


def main():
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--files-dir", required=True)
    p.add_argument("--tool-results", type=int, default=6)
    p.add_argument("--marker", default="E2E-DONE")
    p.add_argument("--overflow-at", type=int, default=0,
                   help="answer one context-overflow 400 per session at this tool step (0: never)")
    p.add_argument("--no-gzip", action="store_true")
    ARGS = p.parse_args()
    srv = ThreadingHTTPServer(("127.0.0.1", ARGS.port), Handler)
    srv.daemon_threads = True
    with open(ARGS.port_file + ".tmp", "w") as f:
        f.write(str(srv.server_address[1]))
    os.replace(ARGS.port_file + ".tmp", ARGS.port_file)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
