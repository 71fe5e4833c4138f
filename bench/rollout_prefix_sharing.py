"""Prefix sharing in the HF rollout engine: encode each prompt once and copy its KV cache G times, against
re-encoding the prompt for every one of its G samples.

    python bench/rollout_prefix_sharing.py                  # random Llama, about 20 s on one CPU thread
    python bench/rollout_prefix_sharing.py --model DIR      # a real checkpoint, e.g. the bundled SmolLM2

Both modes run the same decode loop (greedy, no stop tokens, so both do exactly max_new_tokens steps) and must
produce the same tokens; only the prefill differs: B*P tokens shared against B*G*P re-encoded. "prefill" is a
run with max_new_tokens=1 (prefill and one sampled token, no decode step); "prefill + decode" the full run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from posttrain.rollout.base import SamplingParams  # noqa: E402
from posttrain.rollout.hf import HFGenerator  # noqa: E402


def random_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
        intermediate_size=704, max_position_embeddings=2048,
    )
    return LlamaForCausalLM(cfg).eval(), 0, "random Llama (4 layers, hidden 256, vocab %d)" % vocab_size


def load_model(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return model, pad, path


def best_time(gen: HFGenerator, prompts, params, G: int, repeats: int):
    """Best wall time of `repeats` runs (the least disturbed by other load), and the last rollout."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        rollout = gen.generate(prompts, params, num_samples=G, seed=0)
        times.append(time.perf_counter() - start)
    return min(times), rollout


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a Hugging Face checkpoint directory (default: a random Llama)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--num-prompts", type=int, default=2)
    ap.add_argument("--num-samples", type=int, default=8, help="G, samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads; 1 gives steady figures on a shared box")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, pad, name = load_model(args.model) if args.model else random_llama(4096)
    model.to(args.device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    # ids from the upper half of the vocabulary: real tokens, away from the special ones at the start
    prompts = torch.randint(vocab // 2, vocab, (args.num_prompts, args.prompt_len), generator=g).tolist()
    G, B = args.num_samples, args.num_prompts
    shared, reencoded = HFGenerator(model, pad), HFGenerator(model, pad, share_prefix=False)
    full = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0, batch_size=B)
    prefill = SamplingParams(max_new_tokens=1, temperature=0.0, batch_size=B)

    shared.generate(prompts[:1], SamplingParams(max_new_tokens=2, temperature=0.0), num_samples=2)  # warm-up
    rows = []
    for label, params in (("prefill", prefill), ("prefill + decode", full)):
        t_shared, r_shared = best_time(shared, prompts, params, G, args.repeats)
        t_reenc, r_reenc = best_time(reencoded, prompts, params, G, args.repeats)
        same = torch.equal(r_shared.completion_ids, r_reenc.completion_ids)
        rows.append((label, t_shared, t_reenc, same))

    print(f"model: {name} on {args.device}, {torch.get_num_threads()} threads")
    print(f"{B} prompts x {args.prompt_len} tokens, G={G} samples each, {args.max_new_tokens} new tokens (greedy)")
    print(f"prefill tokens: shared {B * args.prompt_len}, re-encoded {B * G * args.prompt_len}")
    print(f"{'':18}{'shared':>10}{'re-encoded':>12}{'speed-up':>10}  same tokens")
    for label, ts, tr, same in rows:
        print(f"{label:18}{ts:>9.3f}s{tr:>11.3f}s{tr / ts:>9.2f}x  {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
