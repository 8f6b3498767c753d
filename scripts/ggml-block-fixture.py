#!/usr/bin/env python3
"""Writes src/weights/testdata/ggml_blocks.json: two blocks of each ggml type Pagoda reads, as bytes,
with the values gguf-py (llama.cpp's Python package, `pip install gguf`) decodes them to.

The bytes are random except the f16 scales, which are set to ordinary magnitudes so that no value is
infinite. Run from the repository root; the output is committed and read by the Rust tests."""
import json

import numpy as np
from gguf import GGMLQuantizationType as T, quants

rng = np.random.default_rng(2026)
# type -> (bytes per block, byte offsets of its f16 scales)
LAYOUT = {T.Q4_0: (18, [0]), T.Q4_1: (20, [0, 2]), T.Q8_0: (34, [0]), T.Q4_K: (144, [0, 2]), T.Q6_K: (210, [208])}
cases = []
for ty, (size, scales) in LAYOUT.items():
    blocks = rng.integers(0, 256, size=(2, size), dtype=np.uint8)
    for b in blocks:
        for at in scales:
            b[at:at + 2] = np.frombuffer(np.float16(rng.normal() * 0.02).tobytes(), dtype=np.uint8)
    data = blocks.reshape(-1)
    values = quants.dequantize(data, ty).reshape(-1)
    cases.append({"type": ty.name, "type_id": int(ty), "bytes": data.tolist(), "values": [float(v) for v in values]})
floats = rng.normal(size=16).astype(np.float32)
for ty, dtype in [(T.F16, np.float16)]:
    data = np.frombuffer(floats.astype(dtype).tobytes(), dtype=np.uint8)
    cases.append({"type": ty.name, "type_id": int(ty), "bytes": data.tolist(),
                  "values": [float(v) for v in quants.dequantize(data, ty).reshape(-1)]})
bf16 = (floats.view(np.uint32) >> 16).astype(np.uint16)
data = np.frombuffer(bf16.tobytes(), dtype=np.uint8)
cases.append({"type": "BF16", "type_id": int(T.BF16), "bytes": data.tolist(),
              "values": [float(v) for v in quants.dequantize(data, T.BF16).reshape(-1)]})
with open("src/weights/testdata/ggml_blocks.json", "w") as f:
    json.dump(cases, f, separators=(",", ":"))
    f.write("\n")
