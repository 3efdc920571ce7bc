#!/usr/bin/env python3
"""The assertions of scripts/agents-e2e over one run's directory (--tmp):

  out/NAME.{rc,stdout,stderr}   each agent session's exit code and output
  mock.jsonl                    every request the mock upstream received and every answer
  transcripts/*.jsonl           ctxgate's transcript records

Prints one PASS/FAIL line per check, exits 1 when any failed.
"""

import argparse
import datetime
import glob
import json
import os
import sys

RESULTS = []


def check(name, ok, detail=""):
    RESULTS.append(ok)
    print("%s %s%s" % ("PASS" if ok else "FAIL", name, (" — " + detail) if detail else ""))


def info(text):
    print("     " + text)


def blocks_of(content):
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content or [] if isinstance(b, dict)]


# ------------------------------------------------------------------ which client sent what

ANTHROPIC_MAIN_TOOLS = {"Read", "Bash"}
OPENAI_MAIN_TOOLS = {"read_file", "exec_command", "shell_command", "shell"}


def tool_names(body):
    out = set()
    for t in body.get("tools") or []:
        if isinstance(t, dict):
            fn = t.get("function") if isinstance(t.get("function"), dict) else t
            out.add(fn.get("name"))
    return out


def kind_of(path):
    p = path.split("?")[0]
    if p.endswith("/v1/messages"):
        return "anthropic"
    if p.endswith("/responses"):
        return "responses"
    if p.endswith("/chat/completions"):
        return "chat"
    return None


def is_main(entry):
    body = entry.get("body") or {}
    k = kind_of(entry["path"])
    if k == "anthropic":
        return bool(tool_names(body) & ANTHROPIC_MAIN_TOOLS)
    if k in ("responses", "chat"):
        return bool(tool_names(body) & OPENAI_MAIN_TOOLS)
    return False


class Client:
    def __init__(self, name, kind, model=None, session=None):
        self.name, self.kind, self.model, self.session = name, kind, model, session

    def owns(self, entry):
        if kind_of(entry["path"]) != self.kind:
            return False
        if self.session is not None:
            return entry.get("session") == self.session
        model = entry.get("model") or (entry.get("body") or {}).get("model")
        return model == self.model


# ------------------------------------------------------------------ per-request content checks


def strip_cache_control(obj):
    """Clients move their cache_control breakpoints forward every turn (Claude Code marks the
    newest message, and writes a message's content as one text block while it carries the
    marker, as a plain string after); the content is what must stay, so compare without the
    markers and with string content written as its one text block."""
    if isinstance(obj, dict):
        if isinstance(obj.get("content"), str) and "role" in obj:
            obj = dict(obj, content=[{"type": "text", "text": obj["content"]}])
        return {k: strip_cache_control(v) for k, v in obj.items() if k != "cache_control"}
    if isinstance(obj, list):
        return [strip_cache_control(v) for v in obj]
    return obj


def canon(obj):
    return json.dumps(strip_cache_control(obj), sort_keys=True)


SUMMARY_MARK = "[ctxgate summary of earlier conversation]"


def system_items(kind, body):
    """The system content of a request: top-level system/instructions, and every
    system/developer message wherever it stands, as canonical JSON strings (not ctxgate's own
    summary, which changes by design when the cut moves)."""
    return [x for x in _system_items(kind, body) if SUMMARY_MARK not in x]


def _system_items(kind, body):
    out = []
    if kind == "anthropic":
        out.append("system:" + canon(body.get("system")))
        for m in body.get("messages") or []:
            if m.get("role") == "system":
                out.append(canon(m))
    elif kind == "responses":
        if body.get("instructions"):
            out.append("instructions:" + json.dumps(body.get("instructions")))
        inp = body.get("input")
        for it in inp if isinstance(inp, list) else []:
            if isinstance(it, dict) and it.get("role") in ("system", "developer"):
                out.append(canon(it))
    else:
        for m in body.get("messages") or []:
            if m.get("role") in ("system", "developer"):
                out.append(canon(m))
    return out


def has_exchange(kind, body, call_id):
    """Whether the request holds the call call_id and its result."""
    call = result = False
    if kind == "anthropic":
        for m in body.get("messages") or []:
            for b in blocks_of(m.get("content")):
                if b.get("type") == "tool_use" and b.get("id") == call_id:
                    call = True
                if b.get("type") == "tool_result" and b.get("tool_use_id") == call_id:
                    result = True
    elif kind == "responses":
        inp = body.get("input")
        for it in inp if isinstance(inp, list) else []:
            if not isinstance(it, dict):
                continue
            if it.get("type") in ("function_call", "custom_tool_call") and it.get("call_id") == call_id:
                call = True
            if it.get("type") in ("function_call_output", "custom_tool_call_output") and it.get("call_id") == call_id:
                result = True
    else:
        for m in body.get("messages") or []:
            if m.get("role") == "assistant" and any(c.get("id") == call_id for c in m.get("tool_calls") or []):
                call = True
            if m.get("role") == "tool" and m.get("tool_call_id") == call_id:
                result = True
    return call and result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tmp", required=True)
    ap.add_argument("--tool-results", type=int, required=True)
    ap.add_argument("--marker", default="E2E-DONE")
    ap.add_argument("--sessions", required=True)
    ap.add_argument("--summaries", type=int, default=0, help="1: [prune.summary] was on")
    a = ap.parse_args()
    names = a.sessions.split(",")

    mock = [json.loads(line) for line in open(os.path.join(a.tmp, "mock.jsonl"), encoding="utf-8")]
    records = []
    for f in sorted(glob.glob(os.path.join(a.tmp, "transcripts", "*.jsonl"))):
        records += [json.loads(line) for line in open(f, encoding="utf-8") if line.strip()]

    # -- 1. every session completes
    claude_sessions = {}
    for n in names:
        rc = open(os.path.join(a.tmp, "out", n + ".rc")).read().strip()
        out = open(os.path.join(a.tmp, "out", n + ".stdout"), encoding="utf-8", errors="replace").read()
        ok = rc == "0" and a.marker in out
        detail = "exit %s" % rc
        if n.startswith("claude"):
            try:
                res = json.loads(out)
                claude_sessions[n] = res.get("session_id")
                ok = ok and not res.get("is_error") and a.marker in (res.get("result") or "")
                detail += ", result %r, %s turns" % ((res.get("result") or "")[:60], res.get("num_turns"))
            except ValueError:
                ok = False
                detail += ", stdout is not JSON: %r" % out[:200]
        else:
            detail += ", output %r" % out.strip()[-80:]
        if not ok:
            err = open(os.path.join(a.tmp, "out", n + ".stderr"), encoding="utf-8", errors="replace").read()
            detail += "; stderr tail: %r" % err.strip()[-400:]
        check("%s completes (exit 0, %s in its output)" % (n, a.marker), ok, detail)

    clients = []
    for n in names:
        if n.startswith("claude"):
            sid = claude_sessions.get(n)
            clients.append(Client(n, "anthropic", session=("x-claude-code-session-id=" + sid) if sid else "?"))
        elif n == "codex":
            clients.append(Client(n, "responses", model="gpt-5-codex"))
        elif n == "sdk-responses":
            clients.append(Client(n, "responses", model="gpt-4.1"))
        elif n == "sdk-chat":
            clients.append(Client(n, "chat", model="gpt-4o-mini"))

    # -- 2. the mock rejected nothing
    rejected = [e for e in mock if e["kind"] == "answer" and e.get("rejected")]
    check("the mock upstream rejected nothing", not rejected,
          "%d rejected: %s" % (len(rejected), "; ".join("%s %s" % (e["path"], e["rejected"][:200]) for e in rejected[:5]))
          if rejected else "%d requests validated" % sum(1 for e in mock if e["kind"] == "request"))
    unknown = sorted({e["path"] for e in mock if e["kind"] == "answer" and e.get("unknown")})
    if unknown:
        info("paths the mock does not serve (answered 404): %s" % ", ".join(unknown))

    # -- 3. per client: the tool loop ran to the end; system content and the newest tool
    #       exchange reached the upstream in every forwarded request
    for c in clients:
        entries = [e for e in mock if c.owns(e)]
        answers = [e for e in entries if e["kind"] == "answer"]
        finals = [e for e in answers if e.get("answer") == "text" and e.get("step") == a.tool_results]
        check("%s: the tool loop reached %d tool results and the final answer" % (c.name, a.tool_results),
              bool(finals), "steps answered: %s" % [e.get("step") for e in answers if e.get("answer")])
        last_call = None
        seen_system = []
        missing_system = []
        missing_exchange = []
        n_main = 0
        first_system = None
        for e in entries:
            if e["kind"] == "answer":
                if e.get("tool"):
                    last_call = e["tool"]["id"]
                continue
            if not is_main(e):
                continue
            n_main += 1
            body = e["body"]
            items = system_items(c.kind, body)
            if first_system is None:
                first_system = items[:1]
            for s in seen_system:
                if s not in items:
                    missing_system.append((n_main, s[:120]))
            for s in items:
                if s not in seen_system:
                    seen_system.append(s)
            if last_call and not has_exchange(c.kind, body, last_call):
                missing_exchange.append((n_main, last_call))
        label = {"anthropic": "system and mid-conversation system messages",
                 "responses": "instructions and developer/system items",
                 "chat": "system/developer messages"}[c.kind]
        check("%s: %s kept in every forwarded request" % (c.name, label),
              n_main > 0 and not missing_system,
              "%d requests, %d distinct system items%s" % (
                  n_main, len(seen_system),
                  ("; missing: %s" % missing_system[:3]) if missing_system else ""))
        check("%s: the newest tool exchange (last call and its result) in every forwarded request" % c.name,
              n_main > 1 and not missing_exchange,
              "%d requests%s" % (n_main, ("; missing: %s" % missing_exchange[:3]) if missing_exchange else ""))

    # -- 4. transcripts: pruning happened, usage recorded, conversations told apart.
    # Records carry no path: a Claude Code session's records are told by its session id (the
    # conversation id), the other sessions' by time (they run one after the other; each
    # session's start and end are in out/NAME.window).
    def ts_of(r):
        return datetime.datetime.fromisoformat(r["ts"].replace("Z", "+00:00")).timestamp()

    def recs(c):
        if c.kind == "anthropic":
            sid = claude_sessions.get(c.name) or "?"
            return [r for r in records if r["route"] == "anthropic" and sid in r["conversation_id"]]
        start, end = [float(x) for x in open(os.path.join(a.tmp, "out", c.name + ".window")).read().split()]
        return [r for r in records if r["route"] == "openai" and start <= ts_of(r) <= end]

    for c in clients:
        rs = recs(c)
        actions = {}
        for r in rs:
            actions[r["prune_action"]] = actions.get(r["prune_action"], 0) + 1
        what = {"anthropic": "/v1/messages", "responses": "/responses", "chat": "/chat/completions"}[c.kind]
        peak = max([r.get("tokens_before") or 0 for r in rs] or [0])
        check("%s: ctxgate pruned at least one %s call (prune_action \"pruned\")" % (c.name, what),
              actions.get("pruned", 0) > 0,
              "%d records, prune_action counts %s, largest prompt counted %s tokens" % (len(rs), actions, peak))
        # Every chat call the mock answered with 200 (it always reports usage) must have left a
        # record with the usage the tap read.
        answered = sum(1 for e in mock if e["kind"] == "answer" and c.owns(e) and e.get("status") == 200
                       and e.get("answer"))
        with_usage = [r for r in rs if r["usage"].get("input_tokens") is not None]
        check("%s: transcript records carry usage (usage.input_tokens not null)" % c.name,
              answered > 0 and len(with_usage) >= answered,
              "%d of %d answered chat calls have it" % (len(with_usage), answered))

    cl = [c for c in clients if c.kind == "anthropic"]
    if len(cl) >= 2:
        ids = {}
        for c in cl:
            ids[c.name] = sorted({r["conversation_id"] for r in recs(c)})
        all_ids = sorted({r["conversation_id"] for r in records if r["route"] == "anthropic"})
        distinct = len(all_ids) == len(cl) and all(len(v) == 1 for v in ids.values()) \
            and len({v[0] for v in ids.values() if v}) == len(cl)
        check("%d parallel Claude Code sessions with the same prompt are %d distinct conversation_ids"
              % (len(cl), len(cl)), distinct, "anthropic conversation_ids: %s" % all_ids)

    # -- 5. summaries ([prune.summary]): made with the agents' own credentials, answered, and
    #       carried by later requests, in shapes the mock's validation (the APIs') accepts
    if a.summaries:
        sums = [r for r in records if r.get("kind") == "summary"]
        check("ctxgate summarised moved cuts: summary calls recorded, every one answered 200",
              bool(sums) and all(r["status"] == 200 and not r.get("error_kind") for r in sums),
              "%d summary records by route %s; errors %s" % (
                  len(sums), sorted({r["route"] for r in sums}),
                  [r.get("error_kind") for r in sums if r.get("error_kind")][:3]))
        carried = {}
        for e in mock:
            if e["kind"] == "request" and e.get("body") and SUMMARY_MARK in json.dumps(e["body"]):
                k = kind_of(e["path"])
                carried[k] = carried.get(k, 0) + 1
        check("forwarded agent requests carried ctxgate's summary", sum(carried.values()) > 0,
              "requests with the summary by kind: %s" % carried)

    failed = RESULTS.count(False)
    print("== %d checks, %d passed, %d failed" % (len(RESULTS), len(RESULTS) - failed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
