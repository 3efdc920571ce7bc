#!/usr/bin/env python3
"""Generates the example agent conversations (deterministic; no dependencies).

    python3 examples/gen.py

writes examples/openai-agent.json and examples/anthropic-agent.json, and the same bodies as
tests/fixtures/openai-seed.json and tests/fixtures/anthropic-seed.json. The OpenAI one is
built like the conversation that motivated ctxgate: 22 messages, about 54.7K tokens
(o200k_base), about 218K characters, files pasted into older turns (fenced code blocks and
--- BEGIN FILE --- blocks) and a tool loop with tool_calls and tool results.
"""
import json
import os
import random

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE = 0.99

WORDS = ("invoice amount currency total line item tax rate customer account period ledger "
         "balance discount refund payment status export record row column batch cache retry "
         "config region window budget report summary schedule owner entry").split()


def ident(r, n=2):
    return "_".join(r.choice(WORDS) for _ in range(n))


def py_file(r, funcs):
    out = ['"""Billing helpers generated for the example conversation."""', "",
           "from decimal import Decimal", "import datetime as dt", ""]
    for _ in range(funcs):
        name = ident(r, 3)
        a, b = ident(r, 1), ident(r, 2)
        out += [f"def {name}({a}, {b}=None):",
                f'    """Return the {r.choice(WORDS)} {r.choice(WORDS)} for {a}, rounded to cents."""',
                f"    if {b} is None:",
                f"        {b} = Decimal('{r.randint(1, 99)}.{r.randint(10, 99)}')",
                f"    {ident(r, 1)} = [{a}[k] * {b} for k in range({r.randint(2, 40)})]",
                f"    if len({a}) > {r.randint(3, 900)}:",
                f"        raise ValueError('too many {r.choice(WORDS)} entries: %d' % len({a}))",
                f"    return sum({a}.get('{r.choice(WORDS)}', 0) for _ in range({r.randint(1, 9)}))",
                ""]
    return "\n".join(out) + "\n"


def rs_file(r, funcs):
    out = ["//! Invoice export, generated for the example conversation.", "",
           "use std::collections::BTreeMap;", ""]
    for _ in range(funcs):
        name = ident(r, 3)
        out += [f"/// Computes the {r.choice(WORDS)} {r.choice(WORDS)} of a batch.",
                f"pub fn {name}(rows: &[Row], {ident(r, 1)}: u64) -> Result<u64, Error> {{",
                f"    let mut acc: BTreeMap<String, u64> = BTreeMap::new();",
                f"    for row in rows.iter().filter(|r| r.{ident(r, 1)} > {r.randint(1, 500)}) {{",
                f"        *acc.entry(row.{ident(r, 1)}.clone()).or_default() += row.amount * {r.randint(2, 99)};",
                "    }",
                f"    acc.values().copied().max().ok_or(Error::Empty(\"{ident(r, 2)}\"))",
                "}", ""]
    return "\n".join(out) + "\n"


def log_text(r, lines):
    out = []
    for i in range(lines):
        ok = r.random() > 0.08
        out.append(f"tests/test_{ident(r, 2)}.py::test_{ident(r, 3)} {'PASSED' if ok else 'FAILED'} [{(i * 100) // lines:3d}%]")
    return "\n".join(out) + "\n"


def n(x):
    return max(1, int(x * SCALE))


def build():
    r = random.Random(20261108)
    f_invoice = py_file(r, n(70))
    f_tax = py_file(r, n(60))
    f_tests = py_file(r, n(75))
    f_currency = py_file(r, n(70))
    f_ledger = py_file(r, n(65))
    f_patch = py_file(r, n(30))
    f_docs = "\n".join(f"## {ident(r, 2).replace('_', ' ').title()}\n\nThe {ident(r, 1)} of each "
                       f"{ident(r, 1)} is computed per {r.choice(WORDS)} and rounded to cents; "
                       f"see `{ident(r, 3)}()` for the {r.choice(WORDS)} rules.\n"
                       for _ in range(n(90)))
    f_write = py_file(r, n(35))
    log = log_text(r, n(260))
    grep = "\n".join(f"src/billing/{ident(r, 1)}.py:{r.randint(1, 900)}:    {ident(r, 2)} = "
                     f"export_{ident(r, 1)}(rows)" for _ in range(40)) + "\n"
    f_export = rs_file(r, 14)
    system = ("You are Forge, an autonomous coding agent working in the repository `billing-service`. "
              "You can read and write files and run commands through the tools provided. Work in "
              "small steps: read what you need, change one thing at a time, run the tests after each "
              "change, and explain what you did in a short paragraph. Never invent file contents: "
              "read a file before you edit it. Prefer the standard library. Keep answers short.")
    tools = [
        {"type": "function", "function": {"name": "read_file", "description": "Read a file of the repository.",
                                          "parameters": {"type": "object", "properties": {
                                              "path": {"type": "string", "description": "Path relative to the repository root."}},
                                                         "required": ["path"]}}},
        {"type": "function", "function": {"name": "write_file", "description": "Write a file, replacing its contents.",
                                          "parameters": {"type": "object", "properties": {
                                              "path": {"type": "string", "description": "Path relative to the repository root."},
                                              "content": {"type": "string", "description": "The new contents."}},
                                                         "required": ["path", "content"]}}},
        {"type": "function", "function": {"name": "run", "description": "Run a shell command in the repository.",
                                          "parameters": {"type": "object", "properties": {
                                              "command": {"type": "string", "description": "The command line."},
                                              "timeout": {"type": "string", "description": "Seconds before the command is killed.",
                                                          "enum": ["30", "120", "600"]}},
                                                         "required": ["command"]}}},
    ]
    # (role, text, extra) in a dialect-neutral form; calls are (id, name, args).
    turns = [
        ("user", "I need the invoice code cleaned up. Here are the two main modules.\n\n"
                 f"--- BEGIN FILE: src/billing/invoice.py ---\n{f_invoice}--- END FILE: src/billing/invoice.py ---\n\n"
                 f"--- BEGIN FILE: src/billing/tax.py ---\n{f_tax}--- END FILE: src/billing/tax.py ---\n\n"
                 "Start by telling me what looks wrong.", None),
        ("assistant", "The rounding is applied per line instead of per invoice, and the tax helpers "
                      "recompute the same totals several times. Here is the shape I propose:\n\n"
                      f"```python src/billing/invoice.py\n{f_patch}```\n\nShall I apply it?", None),
        ("user", "Yes, but first check the tests, they are flaky:\n\n"
                 f"```python tests/test_invoice.py\n{f_tests}```", None),
        ("assistant", "Let me read the currency and ledger modules the tests import.",
         [("call_01", "read_file", {"path": "src/billing/currency.py"}),
          ("call_02", "read_file", {"path": "src/billing/ledger.py"})]),
        ("tool", f_currency, "call_01"),
        ("tool", f_ledger, "call_02"),
        ("assistant", "The flakiness comes from `dt.datetime.now()` in the ledger period helpers; "
                      "the tests cross midnight UTC. I will inject the clock.", None),
        ("user", "Ok, do it and run the tests.", None),
        ("assistant", "", [("call_03", "run", {"command": "pytest -q tests/", "timeout": "120"})]),
        ("tool", log, "call_03"),
        ("assistant", "Most tests pass; the failures are the ones that read the wall clock. Patch:\n\n"
                      f"```python src/billing/ledger.py\n{f_patch}```", None),
        ("user", "Good. Update the docs too, this is the current page:\n\n"
                 f"<file path=\"docs/billing.md\">\n{f_docs}</file>", None),
        ("assistant", "", [("call_04", "write_file", {"path": "src/billing/ledger.py", "content": f_write})]),
        ("tool", "wrote 1 file: src/billing/ledger.py", "call_04"),
        ("assistant", "Ledger patched and the docs page now explains per-invoice rounding.", None),
        ("user", "Great. Now add a CSV export for invoices (a `billing export --csv` command) and make "
                 "sure the whole test suite passes.", None),
        ("assistant", "", [("call_05", "run", {"command": "grep -rn export_ src/billing", "timeout": "30"})]),
        ("tool", grep, "call_05"),
        ("assistant", "There is an existing export module in the Rust sidecar; I will mirror its columns.", None),
        ("assistant", "", [("call_06", "read_file", {"path": "sidecar/src/export.rs"})]),
        ("tool", f_export, "call_06"),
    ]
    return system, tools, turns


def openai_body(system, tools, turns):
    msgs = [{"role": "system", "content": system}]
    for role, text, extra in turns:
        if role == "tool":
            msgs.append({"role": "tool", "tool_call_id": extra, "content": text})
        elif role == "assistant" and extra:
            msgs.append({"role": "assistant", "content": text or None, "tool_calls": [
                {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
                for cid, name, args in extra]})
        else:
            msgs.append({"role": role, "content": text})
    return {"model": "gpt-4o", "messages": msgs, "tools": tools, "tool_choice": "auto",
            "temperature": 0.2, "stream": True, "stream_options": {"include_usage": True},
            "metadata": {"conversation_id": "forge-billing-042"}, "x_agent": {"name": "forge", "version": "0.9.3"}}


def anthropic_body(system, tools, turns):
    msgs = []
    for role, text, extra in turns:
        if role == "tool":
            block = {"type": "tool_result", "tool_use_id": extra, "content": text}
            if msgs and msgs[-1]["role"] == "user" and isinstance(msgs[-1]["content"], list) \
                    and all(b["type"] == "tool_result" for b in msgs[-1]["content"]):
                msgs[-1]["content"].append(block)
            else:
                msgs.append({"role": "user", "content": [block]})
        elif role == "assistant":
            blocks = [{"type": "text", "text": text}] if text else []
            for cid, name, args in extra or []:
                blocks.append({"type": "tool_use", "id": cid.replace("call", "toolu"), "name": name, "input": args})
            if msgs and msgs[-1]["role"] == "assistant":
                msgs[-1]["content"].extend(blocks)
            else:
                msgs.append({"role": "assistant", "content": blocks})
        else:
            msgs.append({"role": "user", "content": [{"type": "text", "text": text}]})
    for m in msgs:
        if m["role"] == "user":
            for b in m["content"]:
                if b["type"] == "tool_result":
                    b["tool_use_id"] = b["tool_use_id"].replace("call", "toolu")
    msgs[0]["content"][0]["cache_control"] = {"type": "ephemeral"}
    atools = [{"name": t["function"]["name"], "description": t["function"]["description"],
               "input_schema": t["function"]["parameters"]} for t in tools]
    return {"model": "claude-sonnet-4-5", "max_tokens": 4096,
            "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
            "messages": msgs, "tools": atools, "stream": True,
            "metadata": {"user_id": "forge-billing-042"}, "temperature": 0.2}


def write(path, body):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(body, f, indent=1, ensure_ascii=False)
        f.write("\n")


def main():
    system, tools, turns = build()
    o = openai_body(system, tools, turns)
    a = anthropic_body(system, tools, turns)
    for path, body in [("examples/openai-agent.json", o), ("tests/fixtures/openai-seed.json", o),
                       ("examples/anthropic-agent.json", a), ("tests/fixtures/anthropic-seed.json", a)]:
        write(os.path.join(ROOT, path), body)
    chars = sum(len(json.dumps(m)) for m in o["messages"])
    print(f"openai: {len(o['messages'])} messages, {chars} chars; anthropic: {len(a['messages'])} messages")


if __name__ == "__main__":
    main()
