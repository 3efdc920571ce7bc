"""Real SDK clients for tests/sdk.rs: the official openai and anthropic packages, with only
their base URL pointed at ctxgate. Prints one JSON object with what each call returned."""
import json
import sys

import anthropic
import openai


def long_conversation(base: str, fixture: str) -> None:
    """Sends a long agent conversation through ctxgate with the openai SDK."""
    with open(fixture, encoding="utf-8") as f:
        body = json.load(f)
    oa = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-test-openai-0123456789", max_retries=0)
    r = oa.chat.completions.with_raw_response.create(
        model=body["model"], messages=body["messages"], tools=body.get("tools", [])
    )
    print(json.dumps({"tokens_before": r.headers.get("x-ctxgate-tokens-before"),
                      "tokens_after": r.headers.get("x-ctxgate-tokens-after"),
                      "text": r.parse().choices[0].message.content}))


def main() -> None:
    base = sys.argv[1].rstrip("/")
    if len(sys.argv) > 3 and sys.argv[2] == "long":
        long_conversation(base, sys.argv[3])
        return
    out = {}
    oa = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-test-openai-0123456789", max_retries=0)
    r = oa.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello."}]
    )
    out["openai"] = {"id": r.id, "text": r.choices[0].message.content,
                     "prompt_tokens": r.usage.prompt_tokens}
    chunks = oa.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello."}], stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for c in chunks:
        if c.choices and c.choices[0].delta.content:
            text += c.choices[0].delta.content
        if c.usage:
            usage = c.usage.prompt_tokens
    out["openai_stream"] = {"text": text, "prompt_tokens": usage}

    an = anthropic.Anthropic(base_url=f"{base}/anthropic", api_key="sk-ant-test-0123456789",
                             max_retries=0)
    m = an.messages.create(model="claude-sonnet-4-5", max_tokens=64,
                           messages=[{"role": "user", "content": "Say hello."}])
    out["anthropic"] = {"id": m.id, "text": m.content[0].text,
                        "input_tokens": m.usage.input_tokens}
    with an.messages.stream(model="claude-sonnet-4-5", max_tokens=64,
                            messages=[{"role": "user", "content": "Say hello."}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    out["anthropic_stream"] = {"text": text, "output_tokens": final.usage.output_tokens}
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
