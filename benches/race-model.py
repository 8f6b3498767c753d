"""Writes the CPU race's larger model: the engine benchmark's shape (`benches/engine.rs`: hidden
1024, 8 layers, 16 query heads and 8 KV heads of 64, MLP 2816) as a bf16 GGUF with random
weights, and SmolLM2's vocabulary and tokenizer copied from the race's SmolLM2 file, so that
llama.cpp and Pagoda load the same file and can tokenize the benchmark's prompts.

Usage: python race-model.py GGUF_PY_DIR SMOLLM2.gguf OUT.gguf   (needs numpy and PyYAML)

Called by `benches/cpu-race.sh` with MODEL=larger; the weights are random (seeded), which changes
nothing in the work either server does per token."""

import sys

import numpy as np

gguf_py, source, out = sys.argv[1:4]
sys.path.insert(0, gguf_py)
import gguf  # noqa: E402  (llama.cpp's own GGUF library, from the vendored tree)

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, MLP = 1024, 8, 16, 8, 64, 2816

reader = gguf.GGUFReader(source)
writer = gguf.GGUFWriter(out, "llama")
vocab = 0
for name, field in reader.fields.items():
    if not name.startswith("tokenizer."):
        continue
    kind = field.types[0]
    sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
    value = field.contents()
    writer.add_key_value(name, value, kind, sub_type=sub)
    if name == "tokenizer.ggml.tokens":
        vocab = len(value)
assert vocab > 0, f"{source} has no tokenizer.ggml.tokens"

writer.add_name("pagoda-race-larger-random")
writer.add_context_length(8192)
writer.add_embedding_length(HIDDEN)
writer.add_block_count(LAYERS)
writer.add_feed_forward_length(MLP)
writer.add_head_count(HEADS)
writer.add_head_count_kv(KV_HEADS)
writer.add_rope_dimension_count(HEAD_DIM)
writer.add_layer_norm_rms_eps(1e-5)
writer.add_rope_freq_base(10000.0)
writer.add_vocab_size(vocab)
writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)

rng = np.random.default_rng(1)


def matrix(name, rows, cols):
    values = rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    writer.add_tensor(name, bf16, raw_dtype=gguf.GGMLQuantizationType.BF16)


def ones(name):
    writer.add_tensor(name, np.ones(HIDDEN, dtype=np.float32))


# The output projection is tied to the embedding (as in SmolLM2): no `output.weight`.
matrix("token_embd.weight", vocab, HIDDEN)
for i in range(LAYERS):
    ones(f"blk.{i}.attn_norm.weight")
    matrix(f"blk.{i}.attn_q.weight", HEADS * HEAD_DIM, HIDDEN)
    matrix(f"blk.{i}.attn_k.weight", KV_HEADS * HEAD_DIM, HIDDEN)
    matrix(f"blk.{i}.attn_v.weight", KV_HEADS * HEAD_DIM, HIDDEN)
    matrix(f"blk.{i}.attn_output.weight", HIDDEN, HEADS * HEAD_DIM)
    ones(f"blk.{i}.ffn_norm.weight")
    matrix(f"blk.{i}.ffn_gate.weight", MLP, HIDDEN)
    matrix(f"blk.{i}.ffn_up.weight", MLP, HIDDEN)
    matrix(f"blk.{i}.ffn_down.weight", HIDDEN, MLP)
ones("output_norm.weight")

writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()
print(f"wrote {out}: {vocab} tokens, {LAYERS} layers of {HIDDEN}")
