#!/usr/bin/env python3
"""The peers Pagoda's GPU benchmarks are compared with, on the same GPU and the same shapes:
PyTorch's scaled_dot_product_attention for decode attention, and transformers' generate for a
Llama-3-8B-shaped model with random bf16 weights. Needs torch and transformers (the GPU machine
has them); writes JSON with --json. Run by scripts/gpu-check.sh."""

import argparse
import json
import sys
import time


def sdpa(batches, contexts, iterations):
    import torch
    import torch.nn.functional as F

    heads, kv_heads, head_dim = 32, 8, 128
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    results = []
    for batch in batches:
        for context in contexts:
            q = torch.randn(batch, heads, 1, head_dim, dtype=torch.bfloat16, device="cuda")
            k = torch.randn(batch, kv_heads, context, head_dim, dtype=torch.bfloat16, device="cuda")
            v = torch.randn_like(k)
            for _ in range(3):
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            total = 0.0
            for _ in range(iterations):
                flush.zero_()  # evict K and V from L2, as Pagoda's benchmark does
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                end.record()
                end.synchronize()
                total += start.elapsed_time(end) / 1e3
            seconds = total / iterations
            results.append({"batch": batch, "context": context, "seconds": seconds})
            del q, k, v
    return results


def transformers_decode(batch, prompt_len, new_tokens):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.eval()
    ids = torch.randint(0, config.vocab_size, (batch, prompt_len), device="cuda")
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
        torch.cuda.synchronize()
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "tokens_per_second": batch * new_tokens / seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json")
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    report = {}
    try:
        report["sdpa"] = sdpa([1, 16, 64, 128], [512, 2048, 8192], args.iterations)
    except Exception as e:  # report and go on: the other peer may still run
        report["sdpa_error"] = repr(e)
    try:
        report["transformers"] = transformers_decode(64, 128, 32)
    except Exception as e:
        report["transformers_error"] = repr(e)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 0 if "sdpa" in report and "transformers" in report else 1


if __name__ == "__main__":
    sys.exit(main())
