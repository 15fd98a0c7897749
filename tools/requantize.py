#!/usr/bin/env python3
"""Requantizes a GGUF file with llama.cpp's own quantizer, for side-by-side benchmarks.

Runs in the peer venv (llama-cpp-python; ../shared/peer/setup.sh builds it), never as a
dependency of Starling. The default model is Q4_1; requantizing from it (allow_requantize)
gives the file layouts people download (Q4_K_M mixes Q4_K with Q6_K, and so on), though
not their exact weights.

  PEER=/root/.cache/starling-peer/venv/bin/python
  $PEER tools/requantize.py models/SmolLM2-135M-Instruct.Q4_1.gguf models/requant \
      Q4_K_M Q5_K_M Q6_K Q8_0 Q4_0 F16

Writes OUT_DIR/<stem>.<TYPE>.gguf for each type (files are never committed) and prints
each path with its size.
"""
import ctypes
import pathlib
import sys

import llama_cpp


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    source, out_dir, types = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3:]
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = source.name.split(".")[0]
    for name in types:
        ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.upper()}", None)
        if ftype is None:
            sys.exit(f"unknown type {name}")
        dest = out_dir / f"{stem}.{name.upper()}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.allow_requantize = True
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), ctypes.byref(params))
        if rc != 0:
            sys.exit(f"quantizing to {name} failed ({rc})")
        print(f"{dest} {dest.stat().st_size}")


if __name__ == "__main__":
    main()
