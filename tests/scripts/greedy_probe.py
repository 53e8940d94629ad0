"""Greedy tokens of base + one adapter, loaded through one backend: what the Unsloth test compares with hf.

    python tests/scripts/greedy_probe.py MODEL_DIR ADAPTER_DIR {hf,unsloth} [NEW_TOKENS]

Prints one JSON line: {"backend": ..., "tokens": [[ids of prompt 0], ...]}. A process of its own, so that
unsloth (which patches transformers when imported) is imported first, or not at all for hf.
"""
import json
import sys

model_dir, adapter, backend = sys.argv[1:4]
new_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 24
if backend == "unsloth":
    import unsloth  # noqa: F401  (before transformers)

import torch  # noqa: E402

from spin_lite.config import GenerationSettings, LoraSettings, ModelConfig  # noqa: E402
from spin_lite.generate import generate_batch, stop_token_ids  # noqa: E402
from spin_lite.model import load_base, load_tokenizer, with_adapter  # noqa: E402

cfg = ModelConfig(name=model_dir, load_in_4bit=True, backend=backend)
tokenizer = load_tokenizer(cfg)
model = with_adapter(load_base(cfg, backend=backend), LoraSettings(), adapter).eval()
if backend == "unsloth":
    from unsloth import FastLanguageModel
    FastLanguageModel.for_inference(model)
questions = ["What is the capital of France?", "Write a haiku about rain.", "Name three prime numbers.",
             "How do I boil an egg?"]
prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False) for q in questions]
with torch.no_grad():
    out = generate_batch(model, prompts, GenerationSettings(do_sample=False, engine="eager"),
                         stop_token_ids(tokenizer, model), tokenizer.pad_token_id, seed=0, max_new_tokens=new_tokens)
print(json.dumps({"backend": backend, "tokens": [ids for ids, _ in out]}))
