"""Hugging Face transformers `generate` on the same GGUF, single stream, in its own process so its
memory does not count against the engine's peak RSS. Prints one JSON object."""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    args = json.loads(sys.argv[1])
    import torch
    from transformers import AutoModelForCausalLM

    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    model = AutoModelForCausalLM.from_pretrained(args["dir"], gguf_file=args["file"]).eval()
    ids = torch.tensor([args["prompt_ids"]])
    n = args["new_tokens"]
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        t2 = time.perf_counter()
    # decode-only rate: the n-token run minus the prefill-and-first-token run
    print(json.dumps({"hf_decode_tok_s": (n - 1) / ((t2 - t1) - (t1 - t0))}))


if __name__ == "__main__":
    main()
