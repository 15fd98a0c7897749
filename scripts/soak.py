#!/usr/bin/env python3
"""Soak test for a running Starling server (standard library only).

N concurrent streaming clients for D seconds per round, mixing chat completions,
completions, session turns and mid-stream disconnects. After each round it checks:
zero 5xx, every stream ended with done / [DONE] / an error event, KV blocks in use back
at the idle baseline (via GET /admin/stats, needs the admin key), and across rounds that
the server's RSS (/proc/PID/status) grew by at most 5%.

Usage:
  STARLING_ADMIN_KEY=adm cargo run --release -- serve &
  python3 scripts/soak.py --url http://127.0.0.1:8080 --pid $! --admin-key adm \
      [--clients 32] [--seconds 60] [--rounds 2]
"""
import argparse
import http.client
import json
import sys
import threading
import time
from urllib.parse import urlparse


def post(url, path, body, key=None, read=True):
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request("POST", path, json.dumps(body), headers)
    return conn, conn.getresponse()


def stats(url, admin_key):
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", "/admin/stats", headers={"Authorization": f"Bearer {admin_key}"})
    r = conn.getresponse()
    assert r.status == 200, f"/admin/stats: {r.status} {r.read()!r}"
    return json.loads(r.read())


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def last_frame(resp):
    """Reads SSE frames to the end; returns the last non-comment frame's (event, data)."""
    event, data, last = None, [], None
    for raw in resp:
        line = raw.decode().rstrip("\r\n")
        if line == "":
            if data or event:
                last = (event, "\n".join(data))
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    return last


def client(url, key, n, until, out, lock):
    mine = {"ok": 0, "5xx": 0, "unterminated": 0, "disconnects": 0, "4xx": 0}
    session = f"soak-{n}"
    i = n
    while time.time() < until:
        kind = i % 4
        i += 1
        if kind == 0:
            path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": f"Tell me about {i}"}], "max_tokens": 16, "stream": True, "stream_options": {"include_usage": True}}
        elif kind == 1:
            path, body = "/v1/completions", {"prompt": f"Number {i} is", "max_tokens": 16, "stream": True}
        elif kind == 2:
            path, body = "/v1/generate", {"prompt": f"Turn {i}:", "session_id": session, "max_tokens": 8}
        else:
            path, body = "/v1/generate", {"prompt": "A long story:", "max_tokens": 128, "ignore_eos": True}
        try:
            conn, resp = post(url, path, body, key)
        except OSError as e:
            mine["unterminated"] += 1
            print(f"connection error: {e}", file=sys.stderr)
            continue
        if resp.status >= 500:
            mine["5xx"] += 1
            print(f"{path}: {resp.status} {resp.read()!r}", file=sys.stderr)
        elif resp.status != 200:
            mine["4xx"] += 1
            resp.read()
        elif kind == 3:
            resp.readline()  # the first frame, then leave
            mine["disconnects"] += 1
        else:
            last = last_frame(resp)
            ok = last is not None and (last[1] == "[DONE]" or last[0] in ("done", "error"))
            mine["ok" if ok else "unterminated"] += 1
        conn.close()
    conn, resp = post(url, "/v1/session/close", {"session_id": session}, key)
    resp.read()
    conn.close()
    with lock:
        for k, v in mine.items():
            out[k] = out.get(k, 0) + v


def round_(args):
    out, lock = {}, threading.Lock()
    until = time.time() + args.seconds
    threads = [threading.Thread(target=client, args=(args.url, args.api_key, n, until, out, lock)) for n in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def kv_used(args):
    return sum(m["kv_blocks_used"] for m in stats(args.url, args.admin_key)["models"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--admin-key", required=True)
    p.add_argument("--api-key")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    baseline = kv_used(args)
    failures, rss = [], []
    for r in range(args.rounds):
        counts = round_(args)
        deadline = time.time() + 30
        while kv_used(args) != baseline and time.time() < deadline:
            time.sleep(0.2)
        used = kv_used(args)
        rss.append(rss_kib(args.pid))
        print(json.dumps({"round": r + 1, **counts, "kv_blocks_used": used, "kv_baseline": baseline, "rss_kib": rss[-1]}))
        if counts.get("5xx", 0) or counts.get("unterminated", 0):
            failures.append(f"round {r + 1}: {counts}")
        if used != baseline:
            failures.append(f"round {r + 1}: {used} KV blocks in use, baseline {baseline}")
    for a, b in zip(rss, rss[1:]):
        if b > a * 1.05:
            failures.append(f"RSS grew from {a} KiB to {b} KiB (more than 5%)")
    if failures:
        print("FAIL: " + "; ".join(failures))
        sys.exit(1)
    print("PASS")


if __name__ == "__main__":
    main()
