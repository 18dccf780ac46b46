"""A client of a frontend, run by tests/test_two_hosts.py inside the frontend's network
namespace (``ip netns exec A python two_hosts_client.py ...``); it answers in JSON on stdout.

    ask URL MODEL TEXT   wait until /v1/models lists MODEL, ask it TEXT with the openai client
                         -> {"models": [...], "reply": "...", "requests": {"instance": count}}
    watch URL MODEL S    print "listed" once MODEL is listed, then poll until it is not
                         -> {"gone_at": unix time or null after S seconds, "models": [...]}

URL is the frontend's base URL (http://HOST:PORT/v1).
"""

from __future__ import annotations

import json
import re
import sys
import time

import httpx
import openai


def models(url: str) -> list[str]:
    try:
        data = httpx.get(url + "/models", timeout=2).json()
    except httpx.TransportError:
        return []
    return sorted(m["id"] for m in data.get("data", []))


def wait_listed(url: str, model: str, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    seen = models(url)
    while model not in seen:
        if time.monotonic() > deadline:
            raise SystemExit(f"{model} not listed in {timeout}s: {seen}")
        time.sleep(0.1)
        seen = models(url)
    return seen


def requests_per_instance(url: str) -> dict[str, float]:
    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=5).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("dynamo_frontend_worker_requests_total{"):
            found = re.search(r'instance="([^"]*)"', line)
            if found:
                counts[found[1]] = counts.get(found[1], 0) + float(line.rpartition(" ")[2])
    return counts


def ask(url: str, model: str, text: str) -> dict[str, object]:
    listed = wait_listed(url, model, 30)
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=30)
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=200
    )
    return {
        "models": listed,
        "reply": reply.choices[0].message.content,
        "requests": requests_per_instance(url),
    }


def watch(url: str, model: str, timeout: float) -> dict[str, object]:
    wait_listed(url, model, 30)
    print("listed", flush=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = models(url)
        if model not in seen:
            return {"gone_at": time.time(), "models": seen}
        time.sleep(0.05)
    return {"gone_at": None, "models": models(url)}


def main(argv: list[str]) -> None:
    command, url, model, arg = argv
    result = ask(url, model, arg) if command == "ask" else watch(url, model, float(arg))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
