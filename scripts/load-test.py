#!/usr/bin/env python3
"""Load test for `lacuna serve`: N concurrent clients stream completions for T seconds.

Each client loops: POST /v1/completions with stream=true (and stream_options.include_usage),
timing the first token and the tokens after it, until the duration is over (a request started
before the end is allowed to finish). Prints one JSON object:

  clients, duration_s, requests, completed, status_5xx, status_4xx, lost (no [DONE] or a broken
  connection), generated_tokens, tokens_per_s (aggregate, over the wall time of the run),
  ttft_p50_s / ttft_p99_s (time to first token), tpot_p50_s / tpot_p99_s (time per output token
  after the first), e2e_p50_s.

Only the standard library is used. Example:
  scripts/load-test.py --url http://127.0.0.1:8000 --model NAME --clients 32 --duration 60
"""

import argparse
import http.client
import json
import sys
import threading
import time
import urllib.parse

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "List some facts about the moon.",
    "Describe a walk through a forest in autumn.",
    "What makes a good cup of tea?",
    "Tell me about the history of printing.",
]


def percentile(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))
    return xs[i]


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = self.completed = self.s5xx = self.s4xx = self.lost = self.tokens = 0
        self.ttft, self.tpot, self.e2e = [], [], []


def one_request(u, args, prompt, stats):
    body = json.dumps({
        "model": args.model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": args.temperature,
        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": not args.stop_at_eos,
    })
    headers = {"content-type": "application/json"}
    if args.api_key:
        headers["authorization"] = f"Bearer {args.api_key}"
    t0 = time.perf_counter()
    first = None
    tokens = 0
    done = False
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=args.timeout)
    try:
        conn.request("POST", "/v1/completions", body=body, headers=headers)
        r = conn.getresponse()
        if r.status >= 400:
            r.read()
            with stats.lock:
                stats.requests += 1
                if r.status >= 500:
                    stats.s5xx += 1
                else:
                    stats.s4xx += 1
            return
        for raw in r:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            ev = json.loads(data)
            if "error" in ev:
                break
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
            for ch in ev.get("choices", []):
                if ch.get("text") and first is None:
                    first = time.perf_counter()
    except (OSError, http.client.HTTPException, ValueError):
        done = False
    finally:
        conn.close()
    t1 = time.perf_counter()
    with stats.lock:
        stats.requests += 1
        if not done:
            stats.lost += 1
            return
        stats.completed += 1
        stats.tokens += tokens
        stats.e2e.append(t1 - t0)
        if first is not None:
            stats.ttft.append(first - t0)
            if tokens > 1:
                stats.tpot.append((t1 - first) / (tokens - 1))


def client(i, u, args, stats, deadline):
    k = i
    while time.perf_counter() < deadline:
        one_request(u, args, PROMPTS[k % len(PROMPTS)], stats)
        k += 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--stop-at-eos", action="store_true",
                    help="let requests end at EOS (default: ignore_eos, every request generates --max-tokens)")
    args = ap.parse_args()
    u = urllib.parse.urlparse(args.url)
    stats = Stats()
    t0 = time.perf_counter()
    deadline = t0 + args.duration
    threads = [threading.Thread(target=client, args=(i, u, args, stats, deadline)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    out = {
        "clients": args.clients,
        "duration_s": args.duration,
        "wall_s": round(wall, 3),
        "max_tokens": args.max_tokens,
        "requests": stats.requests,
        "completed": stats.completed,
        "status_5xx": stats.s5xx,
        "status_4xx": stats.s4xx,
        "lost": stats.lost,
        "generated_tokens": stats.tokens,
        "tokens_per_s": round(stats.tokens / wall, 3) if wall > 0 else None,
        "ttft_p50_s": percentile(stats.ttft, 0.5),
        "ttft_p99_s": percentile(stats.ttft, 0.99),
        "tpot_p50_s": percentile(stats.tpot, 0.5),
        "tpot_p99_s": percentile(stats.tpot, 0.99),
        "e2e_p50_s": percentile(stats.e2e, 0.5),
    }
    print(json.dumps(out, indent=2))
    return 0 if stats.s5xx == 0 and stats.lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
