"""Example agent for docker/compose.yaml: a coding-assistant loop through ctxgate.

It talks to the OpenAI API with the official SDK; the only change an agent needs for ctxgate is
its base URL (OPENAI_BASE_URL=http://ctxgate:8787/v1, set by compose.yaml). The API key comes
from the environment (OPENAI_API_KEY, from docker/.env) and passes through ctxgate untouched.
Every call carries the conversation id in `x-conversation-id`, so ctxgate gates and prunes
this conversation on its own; the history grows until ctxgate's budget prunes it.
"""

import os
import sys
import time
import uuid

from openai import OpenAI

MODEL = os.environ.get("AGENT_MODEL", "gpt-4o-mini")
INTERVAL = float(os.environ.get("AGENT_INTERVAL_SECONDS", "30"))
MAX_CALLS = int(os.environ.get("AGENT_MAX_CALLS", "0"))  # 0: run until stopped

TASKS = [
    "Write a Python function that parses an ISO 8601 duration like 'PT1H30M' into seconds.",
    "Add unit tests for that function, including malformed input.",
    "Refactor it to also accept days ('P2DT3H').",
    "Explain the edge cases you handled, briefly.",
]


def main() -> int:
    client = OpenAI(max_retries=2, timeout=120)  # base URL and key from the environment
    conversation = str(uuid.uuid4())
    messages = [{"role": "system", "content": "You are a concise senior Python engineer."}]
    calls = 0
    while MAX_CALLS == 0 or calls < MAX_CALLS:
        messages.append({"role": "user", "content": TASKS[calls % len(TASKS)]})
        try:
            stream = client.chat.completions.create(
                model=MODEL,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers={"x-conversation-id": conversation},
            )
            answer, usage = [], None
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    answer.append(chunk.choices[0].delta.content)
                if chunk.usage:
                    usage = chunk.usage
            messages.append({"role": "assistant", "content": "".join(answer)})
            print(f"call {calls + 1}: {len(messages)} messages, usage={usage}", flush=True)
        except Exception as e:  # keep looping: ctxgate's 429/504 answers are part of the demo
            messages.pop()
            print(f"call {calls + 1} failed: {e}", file=sys.stderr, flush=True)
        calls += 1
        time.sleep(INTERVAL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
