#!/usr/bin/env python3
"""Checks that `llorch-engine random-model` writes model folders Hugging Face `transformers`
loads as they are, and that both agree on what the model says.

For each layout (save_pretrained, hub) and dtype (f32, f16) it writes a small random model
with the engine binary, loads it with `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained`, checks the class, the config and the tokenizer, and compares a
12-token greedy continuation of HF `generate` (F32 upcast, eager attention) with
`llorch-engine generate`'s. Writes nothing in the repo.

    .venv/bin/python scripts/check_random_model.py [--engine target/debug/llorch-engine]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent

# Small, but every shape distinct, and a context shorter than GPT-2's.
CONFIG = {"n_embd": 48, "n_layer": 2, "n_head": 4, "n_positions": 128, "vocab_size": 50257}
PROMPT = "Hello, my dog is"
NEW_TOKENS = 12


def engine(binary, *args):
    out = subprocess.run([binary, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def check(binary, work, layout, dtype):
    out = work / f"{layout}-{dtype}"
    config = work / "config.json"
    engine(binary, "random-model", "--config", str(config), "--out", str(out),
           "--layout", layout, "--dtype", dtype, "--seed", "11", "--std", "0.5",
           "--tokenizer-from", str(ROOT / "models/default"))

    model = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32,
                                                 attn_implementation="eager")
    assert type(model).__name__ == "GPT2LMHeadModel", type(model).__name__
    for key, value in CONFIG.items():
        assert getattr(model.config, key) == value, (key, getattr(model.config, key), value)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(PROMPT)["input_ids"]
    assert ids == [15496, 11, 616, 3290, 318], ids

    model.eval()
    with torch.no_grad():
        hf = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                            pad_token_id=tok.eos_token_id, eos_token_id=None)
    hf_ids = hf[0, len(ids):].tolist()
    ours = engine(binary, "generate", "--model", str(out), "--prompt-ids",
                  ",".join(map(str, ids)), "--max-new-tokens", str(NEW_TOKENS),
                  "--temperature", "0", "--ignore-eos")["generated_ids"]
    assert ours == hf_ids, f"{layout}/{dtype}: llorch {ours} != HF {hf_ids}"
    print(f"{layout:15} {dtype}: transformers loads it as {type(model).__name__}; "
          f"greedy {NEW_TOKENS} tokens equal: {hf_ids}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", default=str(ROOT / "target/debug/llorch-engine"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "config.json").write_text(json.dumps(CONFIG))
        for layout in ("save-pretrained", "hub"):
            for dtype in ("f32", "f16"):
                check(args.engine, work, layout, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
