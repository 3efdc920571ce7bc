#!/usr/bin/env python3
"""A small OpenAI Agents SDK agent with one function tool, read_file, for scripts/agents-e2e.

    sdk_agent.py --base-url http://127.0.0.1:PORT/v1 [--api responses|chat] [--stream] [--model M] PROMPT

Only the base URL points at ctxgate; the key is fake. The Responses API is the SDK's default
model; --api chat uses the chat completions model instead. Prints the run's final output.
"""

import argparse
import asyncio
import sys

from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI


@function_tool
def read_file(path: str) -> str:
    """Read a text file and return its whole content.

    Args:
        path: Absolute path of the file to read.
    """
    with open(path, encoding="utf-8") as f:
        return f.read()


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", required=True)
    p.add_argument("--api", choices=["responses", "chat"], default="responses")
    p.add_argument("--model", default="gpt-4.1")
    p.add_argument("--max-turns", type=int, default=30)
    p.add_argument("--stream", action="store_true", help="Runner.run_streamed instead of Runner.run")
    p.add_argument("prompt")
    a = p.parse_args()
    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=a.base_url, api_key="sk-e2e-fake", max_retries=0)
    if a.api == "responses":
        model = OpenAIResponsesModel(model=a.model, openai_client=client)
    else:
        model = OpenAIChatCompletionsModel(model=a.model, openai_client=client)
    agent = Agent(
        name="e2e-reader",
        instructions="You read the files the user points you to with read_file, then answer.",
        tools=[read_file],
        model=model,
        # Streamed chat completions carry usage only when asked (stream_options.include_usage);
        # the SDK asks only with include_usage=True.
        model_settings=ModelSettings(include_usage=True),
    )
    if a.stream:
        result = Runner.run_streamed(agent, a.prompt, max_turns=a.max_turns)
        async for _ in result.stream_events():
            pass
    else:
        result = await Runner.run(agent, a.prompt, max_turns=a.max_turns)
    print(result.final_output)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
