#!/usr/bin/env python3
"""Train llorch's demo model: a small GPT-2 on the King James Bible.

The default model that ships in models/default/ (see models/default/README.md, the model
card). It has the real GPT-2 architecture and tokenizer (vocabulary 50257), so everything that
serves GPT-2 serves it, but it is small enough to ship in the repository (F16, < 30 MB) and
to train on 2 CPU cores in well under an hour.

Corpus: the King James Version (1611; public domain) as printed by Debian's `bible-kjv`
package (`apt-get install bible-kjv`): `bible -l0 Ge1:1-Re22:21`. Verse numbers are dropped;
each chapter is written as its heading ("Genesis 1"), a blank line, one verse per line and a
blank line. The sha256 of the program's output is checked, so a different text is an error,
not a different model. Every 20th chapter (index % 20 == 19, 59 of 1189) is held out for
validation; the rest is the training set.

Training: GPT2LMHeadModel (eager attention, no dropout), AdamW (betas 0.9/0.95, weight decay
0.1 on matrices), linear warm-up then cosine decay to 10 %, gradient clipping at 1.0, random
windows of the training token stream drawn by a seeded generator, float32 on CPU with
`torch.use_deterministic_algorithms(True)` and a fixed thread count. The result is saved in
F16 with `save_pretrained` (the `transformers` layout: `transformer.` prefix, lm_head tied to
wte); losses are reported for the F16-rounded weights, which is what is served.

Reproducibility: same versions (scripts/requirements.txt), same thread count and same CPU
kernels give the same weights bit for bit (measured: see the model card). Other CPUs or
thread counts change float summation order; the model card says by how much that moves the
result.

Usage (from the repo root, in the venv of scripts/requirements.txt):

    python scripts/train_demo.py                  # trains, writes models/default/
    python scripts/train_demo.py --steps 20 --out /tmp/demo-check   # a short run
    python scripts/train_demo.py --corpus-only --out /tmp/kjv        # writes the split texts
    python scripts/train_demo.py --verify models/default/training.json --stop-after 100 \
        --out /tmp/demo-verify      # retrains and compares the recorded parameter hashes

Writes OUT/{config.json, generation_config.json, model.safetensors, training.json};
training.json holds the settings, the loss curve, the final losses and a sample. The
tokenizer files in OUT are not written (models/default/ already has them).
"""
import argparse
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "models", "default", "tokenizer.json")

# sha256 of `bible -l0 Ge1:1-Re22:21` (bible-kjv 4.38, Debian 12).
KJV_SHA256 = "6f74f5589333c56c263963e6347dba662bae2d96861302e690aaae0b4a855eda"
HELD_OUT_EVERY = 20
NAME = "llorch-demo-kjv-6x192"

SHAPE = dict(n_layer=6, n_head=6, n_embd=192, n_positions=512, vocab_size=50257)

DEFAULTS = dict(
    seed=1611,
    steps=1000,
    batch=4,
    block=512,
    lr=2e-3,
    min_lr_ratio=0.1,
    warmup=60,
    weight_decay=0.1,
    grad_clip=1.0,
    eval_stride=256,
)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def kjv_raw():
    try:
        out = subprocess.run(
            ["bible", "-l0", "Ge1:1-Re22:21"], capture_output=True, check=True
        ).stdout
    except FileNotFoundError:
        sys.exit("train_demo: the corpus comes from Debian's bible-kjv: apt-get install bible-kjv")
    return out


def chapters(raw):
    """[(heading, [verse, ...])] in canonical order."""
    text = raw.decode("utf-8")
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        m = re.match(r"^\s+(\d+) (.*)$", line)
        if m:
            if not out:
                raise ValueError(f"a verse before the first heading: {line!r}")
            out[-1][1].append(m.group(2).strip())
        else:
            out.append((line.strip(), []))
    return out


def chapter_text(heading, verses):
    return heading + "\n\n" + "\n".join(verses) + "\n\n"


def corpus():
    raw = kjv_raw()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != KJV_SHA256:
        sys.exit(
            f"train_demo: `bible -l0 Ge1:1-Re22:21` printed a text with sha256 {digest}, "
            f"not {KJV_SHA256} (bible-kjv 4.38); the weights would differ"
        )
    ch = chapters(raw)
    train = "".join(chapter_text(h, v) for i, (h, v) in enumerate(ch) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1)
    valid = "".join(chapter_text(h, v) for i, (h, v) in enumerate(ch) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1)
    return digest, ch, train, valid


def encode(tok, text):
    return np.array(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def lr_at(step, a):
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    t = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def sliding_nll(model, ids, window, stride):
    """Sum of -log p over ids[1:], each scored once, with a sliding window of `window`
    tokens moved by `stride`: the window starting at b scores the tokens from
    max(previous end, b + 1) to its end, each from the window's tokens before it.
    The same definition as `llorch-engine perplexity`."""
    n = len(ids)
    total, count, prev_end, windows = 0.0, 0, 0, 0
    b = 0
    while True:
        end = min(b + window, n)
        first = max(prev_end, b + 1)
        if first < end:
            x = torch.from_numpy(ids[b:end]).unsqueeze(0)
            logits = model(x).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            rows = torch.arange(first - b - 1, end - b - 1)
            targets = torch.from_numpy(ids[first:end])
            total -= logp[rows, targets].sum().item()
            count += end - first
            windows += 1
        prev_end = end
        if end == n:
            break
        b += stride
    return total, count, windows


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def param_groups(model, wd):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def params_sha256(model):
    """sha256 of every parameter's float32 bytes, in named_parameters order."""
    h = hashlib.sha256()
    for _, p in model.named_parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def f16_copy(model):
    m = GPT2LMHeadModel(model.config)
    m.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    return m.eval()


def sample(model, tok, prompt, n=48):
    ids = tok.encode(prompt, add_special_tokens=False).ids
    x = torch.tensor([ids])
    out = model.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=50256
    )
    return tok.decode(out[0, len(ids):].tolist())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "models", "default"))
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the result depends on it)")
    ap.add_argument("--corpus-only", action="store_true", help="write OUT/{train,valid}.txt and stop")
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--hash-every", type=int, default=50, help="record a parameter hash every N steps")
    ap.add_argument(
        "--verify", metavar="TRAINING_JSON",
        help="retrain and compare the parameter hashes with the ones recorded in TRAINING_JSON "
        "as they come (exit 1 at the first difference); with --stop-after, only that far",
    )
    ap.add_argument("--stop-after", type=int, default=0, help="with --verify: stop after N steps")
    for k, v in DEFAULTS.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)

    digest, ch, train_text, valid_text = corpus()
    log(f"corpus: {len(ch)} chapters, sha256 {digest[:16]}…; train {len(train_text)} chars, valid {len(valid_text)} chars")
    if a.corpus_only:
        for name, text in [("train.txt", train_text), ("valid.txt", valid_text)]:
            with open(os.path.join(a.out, name), "w") as f:
                f.write(text)
        log(f"wrote {a.out}/train.txt and valid.txt")
        return

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    torch.use_deterministic_algorithms(True)
    tok = Tokenizer.from_file(TOKENIZER)
    train_ids, valid_ids = encode(tok, train_text), encode(tok, valid_text)
    log(f"tokens: train {len(train_ids)}, valid {len(valid_ids)}")

    cfg = GPT2Config(
        **SHAPE,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=50256,
        eos_token_id=50256,
        llorch_model_name=NAME,
        attn_implementation="eager",
    )
    model = GPT2LMHeadModel(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model {NAME}: {n_params} parameters ({n_params * 2 / 1e6:.1f} MB in F16)")
    opt = torch.optim.AdamW(param_groups(model, a.weight_decay), lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    rng = np.random.default_rng(a.seed)

    want_hashes = {}
    if a.verify:
        with open(a.verify) as f:
            recorded = json.load(f)
        want_hashes = {int(k): v for k, v in recorded["param_sha256"].items()}
        for k in DEFAULTS:
            if recorded["settings"][k] != getattr(a, k):
                sys.exit(f"train_demo: --verify: {k} is {getattr(a, k)}, the record says {recorded['settings'][k]}")
    hashes = {}
    curve = []
    started = time.time()
    model.train()
    for step in range(a.steps):
        lr = lr_at(step, a)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = rng.integers(0, len(train_ids) - a.block, size=a.batch)
        batch = torch.from_numpy(np.stack([train_ids[s : s + a.block] for s in starts]))
        # HF shifts the labels itself: each window trains block - 1 next-token predictions.
        loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        curve.append(round(loss.item(), 5))
        if (step + 1) % a.log_every == 0 or step + 1 == a.steps:
            el = time.time() - started
            recent = sum(curve[-a.log_every:]) / len(curve[-a.log_every:])
            tps = (step + 1) * a.batch * a.block / el
            eta = el / (step + 1) * (a.steps - step - 1)
            log(f"step {step + 1}/{a.steps} loss {recent:.4f} lr {lr:.2e} {tps:.0f} tok/s, eta {eta / 60:.1f} min")
        if (step + 1) % a.hash_every == 0 or step + 1 == a.steps:
            hashes[step + 1] = params_sha256(model)
            if step + 1 in want_hashes:
                same = hashes[step + 1] == want_hashes[step + 1]
                log(f"verify: parameters after step {step + 1} {'equal' if same else 'DIFFER FROM'} the record")
                if not same:
                    sys.exit(1)
        if a.verify and a.stop_after and step + 1 >= a.stop_after:
            log(f"verify: stopped after step {step + 1}; every recorded hash so far is equal")
            return
    train_seconds = time.time() - started
    if a.verify:
        log("verify: every recorded hash is equal; the weights are reproduced bit for bit")

    model.eval()
    served = f16_copy(model)
    log("evaluating the F16-rounded weights (sliding window, stride %d)" % a.eval_stride)
    results = {}
    for split, ids in [("valid", valid_ids), ("train_sample", train_ids[: len(valid_ids)])]:
        total, count, windows = sliding_nll(served, ids, SHAPE["n_positions"], a.eval_stride)
        results[split] = dict(tokens=int(len(ids)), scored=count, windows=windows, mean_nll=total / count, perplexity=math.exp(total / count))
        log(f"{split}: loss {total / count:.4f}, perplexity {math.exp(total / count):.2f} over {count} tokens")
    samples = {p: sample(served, tok, p) for p in ["And God said,", "In the beginning"]}
    for p, s in samples.items():
        log(f"sample {p!r} -> {s!r}")

    model.half().save_pretrained(a.out, safe_serialization=True)
    weights = os.path.join(a.out, "model.safetensors")
    with open(weights, "rb") as f:
        weights_sha = hashlib.sha256(f.read()).hexdigest()
    report = dict(
        name=NAME,
        shape=SHAPE,
        parameters=n_params,
        settings={**{k: getattr(a, k) for k in DEFAULTS}, "threads": a.threads},
        corpus=dict(source="bible -l0 Ge1:1-Re22:21 (Debian bible-kjv 4.38)", sha256=digest, chapters=len(ch), held_out="every 20th chapter (index % 20 == 19)", train_tokens=int(len(train_ids)), valid_tokens=int(len(valid_ids))),
        versions=dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__, numpy=np.__version__),
        cpu=cpu_model(),
        train_seconds=round(train_seconds, 1),
        final_train_loss_last_50=sum(curve[-50:]) / len(curve[-50:]),
        eval=results,
        samples_greedy_48=samples,
        model_safetensors_sha256=weights_sha,
        param_sha256=hashes,
        loss_curve=curve,
    )
    with open(os.path.join(a.out, "training.json"), "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    log(f"wrote {a.out} (model.safetensors sha256 {weights_sha[:16]}…) in {train_seconds / 60:.1f} min of training")


if __name__ == "__main__":
    main()
