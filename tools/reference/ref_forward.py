"""ref_forward.py -- exact float32 reference forward pass over a GGUF file.

What it is for
--------------
Starling (a Rust CPU inference server) needs an independent oracle for its
logits.  This module reads a GGUF with `gguf.GGUFReader`, dequantizes EVERY
weight exactly to float32 with `gguf.quants.dequantize` (bit-identical to
ggml's own dequantizers), and runs the transformer in float32 numpy
(matmuls via BLAS sgemm; RMSNorm sums of squares in float64; RoPE angles in
float64, then cos/sin rounded to float32).  It differs from llama.cpp only in
numerics: llama.cpp quantizes activations to 8 bits for quantized matmuls,
keeps K/V in f16, uses an f16 GELU table and f32 iterative RoPE angles.

Families (semantics as implemented by llama.cpp, see /work/notes/families.md):
  llama   NORM rope (adjacent pairs), optional rope_freqs factors
  qwen2   NEOX rope, q/k/v biases, optional output.bias
  qwen3   NEOX rope, per-head RMSNorm on Q and K before rope
  gemma3  NEOX rope, per-head Q/K norm, sandwich norms, embeddings * sqrt(n_embd),
          tanh-GELU gated FFN, sliding-window layers (pattern 6 by default) with
          their own rope base, optional final logit softcapping
  phi3    NEOX rope (partial rotary allowed), fused attn_qkv, fused ffn_up
          (first half gate, second half up), rope_factors_long/short, SWA ignored
Any linear layer gets its `.bias` added when the file has one; fused attn_qkv
is accepted for every family; output.weight absent => tied to token_embd.
RoPE: per-layer base/scale, `{arch}.rope.scaling.type` linear (angle * 1/factor),
yarn (llama.cpp's ramp with beta_fast 32 / beta_slow 1 and net magnitude
1 + 0.1 ln factor), none; `rope.scaling.attn_factor` multiplies cos and sin;
frequency factors divide the angle; dims >= rope.dimension_count pass through.
Attention scale 1/sqrt(key_length) (Gemma 3 27B, 62 layers: 1/sqrt(n_embd/n_head)).
Logit softcapping c*tanh(z/c) is applied for gemma3 only (the only one of the five
families whose llama.cpp code reads `{arch}.final_logit_softcapping`).

API
---
    m = load(path, n_ctx=512)     # n_ctx only matters for phi3 long/short factors
    m.logits(ids)  -> np.float32 [len(ids), n_vocab]   (fresh sequence, all positions)
    m.reset(); m.step(ids) -> logits of the new positions, appended to the KV cache
    m.gelu = gelu_f16_table       # optional: llama.cpp's f16-table GELU instead of exact tanh-GELU
    m.step(ids, trace=lst) also appends the residual stream after the embedding
    and after every layer (np arrays [len(ids), n_embd]) to `lst` for debugging.
    m.mm(x, weight_name) is the single matmul hook (emulate_check.py overrides it to
    mimic llama.cpp's 8-bit activations); m.qtype[name] is each tensor's GGUF type.

CLI:  python ref_forward.py model.gguf 2 818 5279   -> prints top-5 at the last position
"""
import math
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

F32 = np.float32
NEOX_ARCHS = {"qwen2", "qwen3", "gemma3", "phi3"}
SUPPORTED = {"llama"} | NEOX_ARCHS


def rms_norm(x, w, eps):
    """y = x / sqrt(mean(x^2) + eps) * w over the last axis (sum of squares in float64)."""
    ms = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True).astype(F32)
    return (x * (F32(1.0) / np.sqrt(ms + F32(eps)))) * w


def silu(x):
    with np.errstate(over="ignore"):
        return x / (F32(1.0) + np.exp(-x))


def gelu_tanh(x):
    c = F32(math.sqrt(2.0 / math.pi))
    return F32(0.5) * x * (F32(1.0) + np.tanh(c * x * (F32(1.0) + F32(0.044715) * x * x)))


def gelu_f16_table(x):
    """llama.cpp's CPU GELU: input and output rounded through f16 (its lookup table); 0 below -10, x above 10."""
    g = gelu_tanh(x.astype(np.float16).astype(F32)).astype(np.float16).astype(F32)
    return np.where(x <= -10, F32(0), np.where(x >= 10, x, g)).astype(F32)


class Model:
    def __init__(self, path, n_ctx=512):
        r = GGUFReader(path)
        self.meta = {k: f for k, f in r.fields.items()}
        arch = self.arch = self.get("general.architecture")
        if arch not in SUPPORTED:
            raise ValueError(f"unsupported architecture {arch!r}")
        A = arch + "."
        # ---- weights: every tensor dequantized to float32, shape [ne1, ne0] (rows = outputs)
        self.w, self.qtype = {}, {}
        for t in r.tensors:
            self.qtype[t.name] = t.tensor_type.name
            a = np.asarray(dequantize(t.data, t.tensor_type), dtype=F32)
            ne = [int(n) for n in t.shape]
            self.w[t.name] = a.reshape(ne[0]) if len(ne) == 1 or math.prod(ne[1:]) == 1 \
                else a.reshape(math.prod(ne[1:]), ne[0])
        # ---- hyperparameters
        self.n_vocab = len(self.meta["tokenizer.ggml.tokens"].data)
        self.n_embd = self.get(A + "embedding_length")
        self.n_layer = self.get(A + "block_count")
        per_layer = lambda v: list(v) if isinstance(v, list) else [v] * self.n_layer
        self.n_head = per_layer(self.get(A + "attention.head_count"))
        self.n_head_kv = per_layer(self.get(A + "attention.head_count_kv", self.n_head))
        self.eps = self.get(A + "attention.layer_norm_rms_epsilon")
        self.d_k = self.get(A + "attention.key_length", self.n_embd // self.n_head[0])
        self.d_v = self.get(A + "attention.value_length", self.n_embd // self.n_head[0])
        self.n_rot = self.get(A + "rope.dimension_count", self.d_k)
        self.neox = arch in NEOX_ARCHS
        # rope: base, linear/yarn scaling, magnitude ("attn_factor"), frequency factors
        base = self.get(A + "rope.freq_base", 10000.0)
        stype = self.get(A + "rope.scaling.type", "linear")
        factor = self.get(A + "rope.scaling.factor", self.get(A + "rope.scale_linear", 0.0))
        fscale = 1.0 if (factor == 0.0 or stype == "none") else 1.0 / factor
        self.yarn = stype == "yarn"
        self.n_ctx_orig = self.get(A + "rope.scaling.original_context_length",
                                   self.get(A + "context_length"))
        mag = self.get(A + "rope.scaling.attn_factor", 1.0)
        if self.yarn and fscale < 1.0:        # net YaRN magnitude after llama.cpp's cancellation
            mag *= 1.0 + 0.1 * math.log(1.0 / fscale)
        self.rope_mag = mag
        ff = self.w.get("rope_freqs.weight")
        if ff is None and "rope_factors_long.weight" in self.w:
            ff = self.w["rope_factors_long.weight" if n_ctx > self.n_ctx_orig
                        else "rope_factors_short.weight"]
        self.rope_ff = None if ff is None else ff.astype(np.float64)
        # per-layer (base, scale, sliding window or 0)
        self.layer_rope = [(base, fscale)] * self.n_layer
        self.window = [0] * self.n_layer
        self.attn_scale = 1.0 / math.sqrt(self.d_k)
        self.softcap = 0.0
        if arch == "gemma3":
            n_swa = self.get(A + "attention.sliding_window", 0)
            if n_swa > 0:
                pat = self.get(A + "attention.sliding_window_pattern", 6)
                if isinstance(pat, list):
                    swa = [bool(p) for p in pat]
                else:   # u32 n: layer il slides iff il % n < n-1 (n == 0: all slide)
                    swa = [pat == 0 or il % pat < pat - 1 for il in range(self.n_layer)]
                base_swa = self.get(A + "rope.freq_base_swa", 10000.0)
                for il in range(self.n_layer):
                    if swa[il]:
                        self.window[il] = n_swa
                        self.layer_rope[il] = (base_swa, 1.0)
            if self.n_layer == 62:   # Gemma 3 27B: query_pre_attn_scalar = n_embd / n_head
                self.attn_scale = 1.0 / math.sqrt(self.n_embd // self.n_head[0])
            self.softcap = self.get(A + "final_logit_softcapping", 0.0)
        self.out_name = "output.weight" if "output.weight" in self.w else "token_embd.weight"
        self.reset()

    def get(self, key, default=KeyError):
        """Metadata value (scalar, str or list); a missing key without default raises."""
        f = self.meta.get(key)
        if f is None:
            if default is KeyError:
                raise KeyError(f"missing GGUF key {key}")
            return default
        return f.contents()

    def reset(self):
        self.pos = 0
        self.k_cache = [None] * self.n_layer   # [n_head_kv, n_pos, d_k]
        self.v_cache = [None] * self.n_layer   # [n_head_kv, n_pos, d_v]

    # ---------------------------------------------------------------- pieces
    def mm(self, x, wname):
        """x [T, n_in] @ W^T for weight tensor `wname` (a hook for numerics experiments)."""
        return x @ self.w[wname].T

    def lin(self, x, name):
        """x [T, n_in] -> x @ W^T (+ bias), W stored as [n_out, n_in]."""
        y = self.mm(x, name + ".weight")
        b = self.w.get(name + ".bias")
        return y if b is None else y + b

    def rope(self, x, positions, base, fscale):
        """Rotate the first n_rot dims of every head of x [T, H, d] in place-copy."""
        n_rot, half = self.n_rot, self.n_rot // 2
        i = np.arange(half, dtype=np.float64)
        theta_e = positions[:, None].astype(np.float64) * base ** (-2.0 * i / n_rot)[None, :]
        if self.rope_ff is not None:
            theta_e = theta_e / self.rope_ff[None, :]
        theta = theta_e * fscale
        if self.yarn and fscale != 1.0:
            corr = lambda b: n_rot * math.log(self.n_ctx_orig / (b * 2 * math.pi)) / (2 * math.log(base))
            low, high = max(0.0, math.floor(corr(32.0))), min(n_rot - 1.0, math.ceil(corr(1.0)))
            ramp = 1.0 - np.clip((i - low) / max(0.001, high - low), 0.0, 1.0)   # ext_factor = 1
            theta = theta * (1.0 - ramp) + theta_e * ramp
        cos = (np.cos(theta) * self.rope_mag).astype(F32)[:, None, :]
        sin = (np.sin(theta) * self.rope_mag).astype(F32)[:, None, :]
        y = x.copy()
        if self.neox:
            i0, i1 = slice(0, half), slice(half, n_rot)
        else:
            i0, i1 = slice(0, n_rot, 2), slice(1, n_rot, 2)
        x0, x1 = x[..., i0], x[..., i1]
        y[..., i0] = x0 * cos - x1 * sin
        y[..., i1] = x0 * sin + x1 * cos
        return y

    def attention(self, il, q, k, v, positions):
        """q [T,H,dk], k/v new entries [T,Hkv,d]; appends to cache, returns [T, H*dv]."""
        kt, vt = k.transpose(1, 0, 2), v.transpose(1, 0, 2)
        if self.k_cache[il] is None:
            self.k_cache[il], self.v_cache[il] = kt, vt
        else:
            self.k_cache[il] = np.concatenate([self.k_cache[il], kt], axis=1)
            self.v_cache[il] = np.concatenate([self.v_cache[il], vt], axis=1)
        K, V = self.k_cache[il], self.v_cache[il]
        n_h, n_kv = q.shape[1], K.shape[0]
        g = n_h // n_kv                          # query head h uses kv head h // g
        K, V = np.repeat(K, g, axis=0), np.repeat(V, g, axis=0)
        s = (q.transpose(1, 0, 2) @ K.transpose(0, 2, 1)) * F32(self.attn_scale)  # [H,T,S]
        kp = np.arange(K.shape[1])[None, :]
        qp = positions[:, None]
        ok = kp <= qp
        if self.window[il]:
            ok &= (qp - kp) < self.window[il]
        s = np.where(ok[None], s, F32(-np.inf))
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        p = s / s.sum(axis=-1, keepdims=True)
        o = p @ V                                # [H, T, dv]
        return o.transpose(1, 0, 2).reshape(q.shape[0], n_h * V.shape[2])

    gelu = staticmethod(gelu_tanh)

    def ffn(self, il, h):
        b = f"blk.{il}."
        if self.arch == "phi3":
            u = self.lin(h, b + "ffn_up")
            n_ff = u.shape[1] // 2
            return self.lin(silu(u[:, :n_ff]) * u[:, n_ff:], b + "ffn_down")
        act = self.gelu if self.arch == "gemma3" else silu
        return self.lin(act(self.lin(h, b + "ffn_gate")) * self.lin(h, b + "ffn_up"), b + "ffn_down")

    # ---------------------------------------------------------------- forward
    def step(self, ids, trace=None):
        """Run tokens `ids` at positions pos..pos+len-1 on top of the cache; return their logits."""
        ids = np.asarray(ids, dtype=np.int64)
        T = len(ids)
        positions = np.arange(self.pos, self.pos + T)
        x = self.w["token_embd.weight"][ids].astype(F32)
        if self.arch == "gemma3":
            x = x * F32(math.sqrt(self.n_embd))
        if trace is not None:
            trace.append(x.copy())
        eps, dk, dv = self.eps, self.d_k, self.d_v
        for il in range(self.n_layer):
            b = f"blk.{il}."
            H, Hkv = self.n_head[il], self.n_head_kv[il]
            h = rms_norm(x, self.w[b + "attn_norm.weight"], eps)
            if b + "attn_qkv.weight" in self.w:  # fused: rows Q, then K, then V
                qkv = self.lin(h, b + "attn_qkv")
                q, k, v = np.split(qkv, [H * dk, H * dk + Hkv * dk], axis=1)
            else:
                q, k, v = (self.lin(h, b + n) for n in ("attn_q", "attn_k", "attn_v"))
            q, k, v = q.reshape(T, H, dk), k.reshape(T, Hkv, dk), v.reshape(T, Hkv, dv)
            if b + "attn_q_norm.weight" in self.w:   # qwen3, gemma3: per-head RMSNorm
                q = rms_norm(q, self.w[b + "attn_q_norm.weight"], eps)
                k = rms_norm(k, self.w[b + "attn_k_norm.weight"], eps)
            base, fscale = self.layer_rope[il]
            q, k = self.rope(q, positions, base, fscale), self.rope(k, positions, base, fscale)
            a = self.lin(self.attention(il, q, k, v, positions), b + "attn_output")
            if self.arch == "gemma3":
                a = rms_norm(a, self.w[b + "post_attention_norm.weight"], eps)
            x = x + a
            f = self.ffn(il, rms_norm(x, self.w[b + "ffn_norm.weight"], eps))
            if self.arch == "gemma3":
                f = rms_norm(f, self.w[b + "post_ffw_norm.weight"], eps)
            x = x + f
            if trace is not None:
                trace.append(x.copy())
        self.pos += T
        x = rms_norm(x, self.w["output_norm.weight"], eps)
        logits = self.mm(x, self.out_name)
        if "output.bias" in self.w:
            logits = logits + self.w["output.bias"]
        if self.softcap:
            c = F32(self.softcap)
            logits = c * np.tanh(logits / c)
        return logits.astype(F32)

    def logits(self, ids):
        """Logits [len(ids), n_vocab] for a fresh sequence (the KV cache is reset first)."""
        self.reset()
        return self.step(ids)


def load(path, n_ctx=512):
    return Model(path, n_ctx=n_ctx)


def log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


if __name__ == "__main__":
    m = load(sys.argv[1])
    lg = m.logits([int(t) for t in sys.argv[2:]])[-1]
    top = np.argsort(-lg)[:5]
    print(" ".join(f"{int(t)}:{lg[t]:.4f}" for t in top))
