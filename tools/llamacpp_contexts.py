#!/usr/bin/env python3
"""llama.cpp's long-context figures, beside `starling bench --contexts`.

Runs in the peer venv (llama-cpp-python; ../shared/peer/setup.sh builds it), never as a
dependency of Starling. ../shared/peer/llamacpp_bench.py takes --prompt-tokens N too, but
its text runs out near 4,400 tokens; this script tokenizes a text long enough for any N
and reports, per length, the same two figures as Starling's context table: prefill of an
N-token prompt (one llama_decode call of n_batch = N, or calls of 8,192 tokens past
that), and single-stream greedy decode of --gen-tokens tokens right after it. Each figure
is the median of --reps runs.

  PEER=/root/.cache/starling-peer/venv/bin/python
  $PEER tools/llamacpp_contexts.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
      --contexts 2048,4096,8000

Prints one JSON object per line: {"context", "prefill_tok_s", "decode_tok_s"}. The KV
cache is llama.cpp's default (f16); flash attention is off, as in its default.
"""
import argparse
import json
import statistics
import time

import numpy as np
import llama_cpp as lc
from llama_cpp import Llama

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--contexts", default="2048,4096,8000")
ap.add_argument("--gen-tokens", type=int, default=32)
ap.add_argument("--reps", type=int, default=1)
a = ap.parse_args()

# Varied words, so the prompt is not one short phrase repeated (tokenizers merge repeats).
WORDS = ("the of and to in is was for on that with as by at from his her an which have are were be "
         "this or had not but it river stone garden window letter morning silver market engine "
         "winter question number quiet yellow distant simple careful ancient").split()


def text(n_words):
    state, out = 12345, []
    for _ in range(n_words):
        state = (state * 1103515245 + 12345) % (1 << 31)
        out.append(WORDS[state % len(WORDS)])
    return " ".join(out)


def measure(n):
    # llama-cpp-python keeps n_batch × n_vocab floats of logits: past 8,192 tokens the
    # prompt goes in 8,192-token calls (llama.cpp splits every call into 512-token
    # micro-batches anyway), or Gemma's 262,144-token vocabulary would need 31 GB at 32k.
    llm = Llama(model_path=a.model, n_ctx=n + a.gen_tokens + 16, n_threads=a.threads,
                n_threads_batch=a.threads, n_batch=min(n, 8192), verbose=False)
    ids = llm.tokenize(text(2 * n).encode(), add_bos=False)[:n]
    assert len(ids) == n, f"text gave {len(ids)} tokens, wanted {n}"
    nv = llm.n_vocab()
    last = lambda: np.ctypeslib.as_array(lc.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(nv,))
    pre, dec = [], []
    for _ in range(a.reps):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        pre.append(n / (time.perf_counter() - t))
        t = time.perf_counter()
        for _ in range(a.gen_tokens):
            llm.eval([int(np.argmax(last()))])
        dec.append(a.gen_tokens / (time.perf_counter() - t))
    return {"context": n, "prefill_tok_s": round(statistics.median(pre), 1),
            "decode_tok_s": round(statistics.median(dec), 1)}


for n in [int(c) for c in a.contexts.split(",")]:
    print(json.dumps(measure(n)), flush=True)
