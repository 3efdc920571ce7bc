#!/usr/bin/env python3
"""Proves the mock upstream's validators reject what the real APIs reject (run by
scripts/agents-e2e before the agents; a validator that accepts everything would make the
"the mock rejected nothing" check worthless). Exits 1 on the first miss."""

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mock_upstream as m  # noqa: E402

m.ARGS = type("A", (), {"tool_results": 6, "marker": "E2E-DONE", "files_dir": "/nonexistent"})()
failures = []


def expect(name, fn, body, reject, **kw):
    try:
        fn(copy.deepcopy(body), **kw)
        got = False
    except m.Reject:
        got = True
    if got != reject:
        failures.append(name)
        print("mock selftest: FAIL %s (expected %s)" % (name, "a rejection" if reject else "acceptance"))


sig = m.thinking_signature("let me think")
use = {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}}
result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}
good = {"thinking": {"type": "enabled"}, "messages": [
    {"role": "user", "content": "task"},
    {"role": "system", "content": "mid-conversation note"},
    {"role": "assistant", "content": [{"type": "thinking", "thinking": "let me think", "signature": sig}, use]},
    {"role": "user", "content": [result]},
]}
beta = "per-turn-control-2026-07-01"
A = m.validate_anthropic
expect("anthropic: a valid tool loop", A, good, False, beta=beta)
bad = copy.deepcopy(good); bad["messages"] = bad["messages"][2:]
expect("anthropic: first message not user", A, bad, True, beta=beta)
bad = copy.deepcopy(good); del bad["messages"][3]
expect("anthropic: tool_use without its tool_result", A, bad, True, beta=beta)
bad = copy.deepcopy(good); bad["messages"][2]["content"] = [{"type": "text", "text": "hi"}]; bad["thinking"] = None
expect("anthropic: tool_result without its tool_use", A, bad, True, beta=beta)
bad = copy.deepcopy(good); bad["messages"].insert(1, {"role": "user", "content": "again"})
expect("anthropic: two user messages in a row", A, bad, True, beta=beta)
bad = copy.deepcopy(good); bad["messages"][2]["content"][0]["thinking"] = "edited thought"
expect("anthropic: thinking text changed under its signature", A, bad, True, beta=beta)
bad = copy.deepcopy(good); bad["messages"][2]["content"] = [use]
expect("anthropic: thinking on, the tool-loop turn lost its thinking", A, bad, True, beta=beta)
bad = copy.deepcopy(good)
bad["system"] = [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}] * 5
expect("anthropic: 5 cache_control breakpoints", A, bad, True, beta=beta)
expect("anthropic: role system without the beta", A, good, True, beta="")

enc = "gAAAAB-selftest"
m.ISSUED_REASONING[enc] = "rs_1"
call = {"type": "function_call", "call_id": "call_1", "name": "shell", "arguments": "{}"}
out = {"type": "function_call_output", "call_id": "call_1", "output": "x"}
rs = {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": enc}
good = {"store": False, "input": [{"role": "user", "content": "task"}, rs, call, out]}
R = m.validate_responses
expect("responses: a valid tool loop", R, good, False)
bad = copy.deepcopy(good); del bad["input"][2]
expect("responses: function_call_output without its function_call", R, bad, True)
bad = copy.deepcopy(good); del bad["input"][3]
expect("responses: function_call without its output", R, bad, True)
bad = copy.deepcopy(good); bad["input"][1]["encrypted_content"] = enc + "x"
expect("responses: encrypted_content not issued byte for byte", R, bad, True)
bad = copy.deepcopy(good); bad["input"] = bad["input"][:2]
expect("responses: reasoning item with no following item", R, bad, True)
bad = copy.deepcopy(good); del bad["input"][1]["encrypted_content"]
expect("responses: reasoning without encrypted_content under store=false", R, bad, True)

C = m.validate_chat
tc = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
good = {"messages": [{"role": "user", "content": "t"}, tc, {"role": "tool", "tool_call_id": "c1", "content": "x"}]}
expect("chat: a valid tool loop", C, good, False)
bad = copy.deepcopy(good); del bad["messages"][1]
expect("chat: tool message without its tool_calls", C, bad, True)
bad = copy.deepcopy(good); del bad["messages"][2]
expect("chat: tool_calls without their tool message", C, bad, True)

if failures:
    sys.exit(1)
print("mock selftest: %s validator cases behave like the APIs" % "all")
