"""Each weight format's predictions against transformers' fp32 logits on the same GGUF file: top-1
agreement and mean KL divergence over `positions` positions of real text. Run by `kvrelay bench
engine` in a process of its own (two models in memory); prints one JSON object."""

from __future__ import annotations

import json
import sys

import torch

from bench.quality import compare, real_text, windows
from common.config import EngineConfig
from common.engine.factory import build_engine
from common.engine.scoring import prompt_logits
from common.model_source import resolve_model


def run(args: dict) -> dict:
    from transformers import AutoModelForCausalLM

    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    src = resolve_model(args["model"])
    hf = AutoModelForCausalLM.from_pretrained(src.path.parent, gguf_file=src.path.name).eval()
    out = {}
    texts = None
    refs = []
    for mode in args["modes"]:
        engine = build_engine(EngineConfig(model=args["model"], quantization=mode), progress=False)
        if texts is None:
            texts = windows(engine.tokenizer.encode(real_text()), args["positions"])
            with torch.inference_mode():
                refs = [hf(torch.tensor([w])).logits[0].float() for w in texts]
        n = agree = kl = 0.0
        for w, ref in zip(texts, refs, strict=True):
            d_n, d_agree, d_kl = compare(prompt_logits(engine.runner.model, w), ref)
            n, agree, kl = n + d_n, agree + d_agree, kl + d_kl
        out[mode] = {"positions": int(n), "top1_agreement": round(agree / n, 4), "mean_kl": float(f"{kl / n:.3g}")}
        del engine
    return out


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
