#!/usr/bin/env python3
"""Checks a running Starling server with the official `openai` Python package.

Streams one chat completion and one completion, checks for non-empty text, usage (with
prompt_tokens_details.cached_tokens) and a clean end of stream ([DONE] is consumed by the
client library; a malformed stream raises). Prints one JSON line and exits non-zero on failure.

Usage: python3 scripts/openai-check.py --base-url http://127.0.0.1:8080/v1 [--api-key KEY]
"""
import argparse
import json
import sys

from openai import OpenAI


def check_stream(stream, text_of):
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += text_of(choice) or ""
            finish = choice.finish_reason or finish
    assert text.strip(), "no text streamed"
    assert usage is not None, "no usage chunk"
    assert usage.completion_tokens > 0 and usage.prompt_tokens > 0, usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage
    assert usage.prompt_tokens_details is not None, "no prompt_tokens_details"
    assert finish in ("stop", "length"), finish
    return {"text": text, "usage": usage.model_dump(), "finish_reason": finish}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", required=True)
    p.add_argument("--api-key", default="unused")
    args = p.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello in one sentence."}],
        max_tokens=12,
        seed=1,
        stream=True,
        stream_options={"include_usage": True},
    )
    chat_result = check_stream(chat, lambda c: c.delta.content)
    completion = client.completions.create(
        model=model, prompt="The sky is", max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    completion_result = check_stream(completion, lambda c: c.text)
    whole = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert whole.choices[0].message.content, whole
    print(json.dumps({"ok": True, "model": model, "chat": chat_result, "completion": completion_result}))


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - report any failure as one line
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
        sys.exit(1)
