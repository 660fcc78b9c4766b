#!/usr/bin/env python3
"""Generate small random GPT-2 models and reference activations for llorch.

Outputs (paths relative to the repo root):

  fixtures/models/tiny/config.json, fixtures/models/tiny/model.safetensors
      "tiny" model (n_embd 32, n_layer 2, n_head 4), F32, written with
      GPT2LMHeadModel.save_pretrained(..., safe_serialization=True): tensor
      names carry the `transformer.` prefix, no attn.bias buffers, no
      lm_head.weight (tied to wte).
  fixtures/models/odd/config.json, fixtures/models/odd/model.safetensors
      "odd" model (n_embd 24, n_layer 3, n_head 3, n_inner 80, n_positions 64)
      in the layout of the hub's openai-community/gpt2 file: names without
      the `transformer.` prefix, per-block `h.{i}.attn.bias` (lower-triangular
      ones [1,1,P,P]) and `h.{i}.attn.masked_bias` (scalar -1e4), every
      tensor stored as F16. References are computed from the F16-rounded
      weights upcast to F32.
  fixtures/reference/<model>/<prompt>/*.npy + meta.json
  fixtures/reference/manifest.json
  fixtures/reference/demo/...
      the same checkpoints for the trained demo model that ships in models/default
      (written by scripts/train_demo.py; F16, upcast to F32 here), plus
      continuation.json (64 greedy ids with top-5 logprobs for two prompts) and
      perplexity/ (a held-out chapter and HF's sliding-window perplexities of it).
      Needs Debian's bible-kjv for the held-out text (as train_demo.py does).

Weights are deliberately scaled well above GPT-2's default init (std 0.02) so
that greedy decoding of random models does not collapse into one repeated
token; seeds are fixed (found with --search) and the script asserts the
"varied greedy path" properties.

Usage (from the repo root):  python scripts/gen_reference.py [--search N]
"""
import argparse
import json
import math
import os
import shutil
import sys
import tempfile

import numpy as np
import safetensors
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "models", "default", "tokenizer.json")
REF_DIR = os.path.join(ROOT, "fixtures", "reference")
EOS = 50256
N_NEW = 24
MIN_MARGIN = 1e-3

PROMPTS = {
    "hello": "Hello.",
    "long": "The quick brown fox jumps over the lazy dog",
}

# Weight scales used by init_weights (std of the normal draws).
SCALES = {
    "wte": 0.5,
    "wpe": 0.5,
    "ln_gain_noise": 0.2,
    "ln_bias": 0.2,
    "attn": 0.5,
    "attn_bias": 0.2,
    "proj": 0.4,
    "fc": 0.5,
    "fc_bias": 0.2,
    "mlp_proj": 0.4,
    "proj_bias": 0.1,
}

MODELS = {
    "tiny": {
        "seed": 37,  # chosen with --search 40 (largest min greedy margin)
        "dir": "fixtures/models/tiny",
        "layout": "save_pretrained",
        "storage_dtype": "F32",
        "config": dict(
            vocab_size=50257, n_positions=1024, n_embd=32, n_layer=2, n_head=4,
            n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
            bos_token_id=EOS, eos_token_id=EOS,
        ),
    },
    "odd": {
        "seed": 22,  # chosen with --search 40 (largest min greedy margin)
        "dir": "fixtures/models/odd",
        "layout": "hub",
        "storage_dtype": "F16",
        "config": dict(
            vocab_size=50257, n_positions=64, n_embd=24, n_layer=3, n_head=3,
            n_inner=80, activation_function="gelu_new", layer_norm_epsilon=1e-5,
            bos_token_id=EOS, eos_token_id=EOS,
        ),
    },
}


# ---------------------------------------------------------------------------
# model construction
# ---------------------------------------------------------------------------
def make_config(cfg):
    return GPT2Config(
        **cfg,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
        attn_implementation="eager",
    )


def init_weights(model, seed, s=SCALES):
    g = torch.Generator().manual_seed(seed)

    def normal(t, std, mean=0.0):
        with torch.no_grad():
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32) * std + mean)

    tr = model.transformer
    normal(tr.wte.weight, s["wte"])
    normal(tr.wpe.weight, s["wpe"])
    for blk in tr.h:
        for ln in (blk.ln_1, blk.ln_2):
            normal(ln.weight, s["ln_gain_noise"], 1.0)
            normal(ln.bias, s["ln_bias"])
        normal(blk.attn.c_attn.weight, s["attn"])
        normal(blk.attn.c_attn.bias, s["attn_bias"])
        normal(blk.attn.c_proj.weight, s["proj"])
        normal(blk.attn.c_proj.bias, s["proj_bias"])
        normal(blk.mlp.c_fc.weight, s["fc"])
        normal(blk.mlp.c_fc.bias, s["fc_bias"])
        normal(blk.mlp.c_proj.weight, s["mlp_proj"])
        normal(blk.mlp.c_proj.bias, s["proj_bias"])
    normal(tr.ln_f.weight, s["ln_gain_noise"], 1.0)
    normal(tr.ln_f.bias, s["ln_bias"])


def build_model(name, seed):
    spec = MODELS[name]
    torch.manual_seed(seed)
    config = make_config(spec["config"])
    model = GPT2LMHeadModel(config)
    init_weights(model, seed)
    if spec["storage_dtype"] == "F16":
        # References must come from exactly the values the F16 file holds.
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
    model.eval()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "lm_head not tied"
    return model


# ---------------------------------------------------------------------------
# greedy decoding
# ---------------------------------------------------------------------------
@torch.no_grad()
def greedy(model, prompt_ids):
    inp = torch.tensor([prompt_ids], dtype=torch.long)
    out = model.generate(
        inp, attention_mask=torch.ones_like(inp), do_sample=False, num_beams=1,
        max_new_tokens=N_NEW, min_new_tokens=N_NEW, pad_token_id=EOS,
        return_dict_in_generate=True, output_logits=True,
    )
    new = out.sequences[0, len(prompt_ids):].tolist()
    margins, raw_argmax = [], []
    for step_logits in out.logits:  # raw (unprocessed) logits, one (1, V) per step
        top2 = torch.topk(step_logits[0].float(), 2)
        margins.append(float(top2.values[0] - top2.values[1]))
        raw_argmax.append(int(top2.indices[0]))
    # cross-check the KV-cached path against one full no-cache forward pass
    full = torch.tensor([prompt_ids + new[:-1]], dtype=torch.long)
    nocache = model(full, use_cache=False).logits[0, len(prompt_ids) - 1:].argmax(-1).tolist()
    assert nocache == new, "KV-cache greedy path differs from no-cache forward"
    return new, margins, raw_argmax


def check_varied(new, margins, raw_argmax):
    """Return a list of problems (empty if the greedy path is acceptable)."""
    problems = []
    if len(new) != N_NEW:
        problems.append(f"generated {len(new)} tokens")
    if new != raw_argmax:
        problems.append("generate() deviates from raw argmax (EOS suppressed?)")
    if EOS in new or EOS in raw_argmax:
        problems.append("EOS in greedy path")
    run = 1
    for a, b in zip(new, new[1:]):
        run = run + 1 if a == b else 1
        if run > 3:
            problems.append("run of >3 identical ids")
            break
    if len(set(new)) < 8:
        problems.append(f"only {len(set(new))} distinct ids")
    if min(margins) < MIN_MARGIN:
        problems.append(f"min margin {min(margins):.2e} < {MIN_MARGIN}")
    return problems


# ---------------------------------------------------------------------------
# reference capture
# ---------------------------------------------------------------------------
@torch.no_grad()
def capture(model, prompt_ids):
    cfg = model.config
    C, NH = cfg.n_embd, cfg.n_head
    hd = C // NH
    T = len(prompt_ids)
    blk = model.transformer.h[0]
    got = {}

    def hook(key):
        def f(_mod, _inp, out):
            got[key] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        return f

    hs = [
        blk.ln_1.register_forward_hook(hook("ln1")),
        blk.attn.c_attn.register_forward_hook(hook("qkv")),
        blk.attn.register_forward_hook(hook("attn_out")),
        blk.ln_2.register_forward_hook(hook("mlp_in")),
        blk.mlp.register_forward_hook(hook("mlp_out")),
        blk.register_forward_hook(hook("block0_out")),
    ]
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    out = model(ids, use_cache=False)
    for h in hs:
        h.remove()
    logits = out.logits[0]

    ln1 = got["ln1"][0]
    qkv = got["qkv"][0]
    q, k, v = qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:]

    # independent check of ln1 input: wte[ids] + wpe[pos]
    tr = model.transformer
    x0 = tr.wte.weight[ids[0]] + tr.wpe.weight[torch.arange(T)]
    ln1_manual = torch.nn.functional.layer_norm(x0, (C,), blk.ln_1.weight, blk.ln_1.bias, cfg.layer_norm_epsilon)
    assert (ln1_manual - ln1).abs().max() < 1e-5

    # manual attention (mirrors HF eager: divide by sqrt(head_dim))
    qh = q.view(T, NH, hd).transpose(0, 1)  # (NH, T, hd)
    kh = k.view(T, NH, hd).transpose(0, 1)
    vh = v.view(T, NH, hd).transpose(0, 1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) / torch.full([], hd ** 0.5, dtype=torch.float32)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    scores = torch.where(causal, scores, torch.full([], float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    ctx = torch.matmul(probs, vh).transpose(0, 1).reshape(T, C)
    attn_manual = blk.attn.c_proj(ctx)
    attn_out = got["attn_out"][0]
    d_attn = float((attn_manual - attn_out).abs().max())
    assert d_attn < 1e-5, f"manual attention differs from HF by {d_attn}"

    mlp_in = got["mlp_in"][0]
    mlp_out = got["mlp_out"][0]
    # manual MLP check (c_fc -> gelu_new -> c_proj)
    hmid = blk.mlp.c_fc(mlp_in)
    hmid = 0.5 * hmid * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (hmid + 0.044715 * torch.pow(hmid, 3.0))))
    d_mlp = float((blk.mlp.c_proj(hmid) - mlp_out).abs().max())
    assert d_mlp < 1e-5, f"manual MLP differs from HF by {d_mlp}"
    block0 = got["block0_out"][0]
    d_blk = float((x0 + attn_out + mlp_out - block0).abs().max())
    assert d_blk < 1e-5, f"residual check differs by {d_blk}"

    arrays = {
        "ln1": ln1, "q": q, "k": k, "v": v, "att_scores": scores, "attn_out": attn_out,
        "mlp_in": mlp_in, "mlp_out": mlp_out, "block0_out": block0, "logits": logits,
    }
    shapes = {
        "ln1": (T, C), "q": (T, C), "k": (T, C), "v": (T, C), "att_scores": (NH, T, T),
        "attn_out": (T, C), "mlp_in": (T, C), "mlp_out": (T, C), "block0_out": (T, C),
        "logits": (T, cfg.vocab_size),
    }
    arrays = {kk: np.ascontiguousarray(vv.numpy().astype("<f4")) for kk, vv in arrays.items()}
    for kk, shp in shapes.items():
        assert arrays[kk].shape == shp, (kk, arrays[kk].shape, shp)
    return arrays, {"attn_manual_vs_hf": d_attn, "mlp_manual_vs_hf": d_mlp}


# ---------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------
def write_save_pretrained(model, out_dir):
    """save_pretrained into a temp dir; keep only config.json + model.safetensors."""
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for fn in ("config.json", "model.safetensors"):
            shutil.copyfile(os.path.join(tmp, fn), os.path.join(out_dir, fn))


def write_hub_layout(model, out_dir):
    """Write weights like the hub's openai-community/gpt2 model.safetensors (F16 here)."""
    os.makedirs(out_dir, exist_ok=True)
    cfg = model.config
    P = cfg.n_positions
    tensors = {}
    for name, t in model.transformer.state_dict().items():
        tensors[name] = t.detach().to(torch.float16).contiguous()
    for i in range(cfg.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(P, P, dtype=torch.float16)).view(1, 1, P, P).contiguous()
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4, dtype=torch.float16)
    assert not any(k.startswith("transformer.") or k.startswith("lm_head") for k in tensors)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})

    hub_config = {
        "activation_function": cfg.activation_function,
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.0,
        "bos_token_id": cfg.bos_token_id,
        "embd_pdrop": 0.0,
        "eos_token_id": cfg.eos_token_id,
        "initializer_range": 0.02,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "model_type": "gpt2",
        "n_ctx": cfg.n_positions,
        "n_embd": cfg.n_embd,
        "n_head": cfg.n_head,
        "n_inner": cfg.n_inner,
        "n_layer": cfg.n_layer,
        "n_positions": cfg.n_positions,
        "resid_pdrop": 0.0,
        "summary_activation": None,
        "summary_first_dropout": 0.0,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "torch_dtype": "float16",
        "vocab_size": cfg.vocab_size,
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hub_config, f, indent=2)
        f.write("\n")


@torch.no_grad()
def reload_check(name, model, prompt_ids):
    """Load the written folder back with HF and compare logits."""
    d = os.path.join(ROOT, MODELS[name]["dir"])
    m2 = GPT2LMHeadModel.from_pretrained(d, torch_dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([prompt_ids])
    diff = float((m2(ids).logits - model(ids).logits).abs().max())
    assert diff == 0.0, f"{name}: reloaded model differs by {diff}"


def tensor_listing(path):
    out = []
    with safetensors.safe_open(path, framework="pt") as f:
        for k in f.keys():
            sl = f.get_slice(k)
            out.append((k, sl.get_dtype(), list(sl.get_shape())))
    return out


def save_npy(path, arr):
    np.save(path, arr, allow_pickle=False)


def write_prompt_reference(name, model, pname, ids, new, margins, extra=None):
    """Writes fixtures/reference/<name>/<pname>/: the checkpoint tensors of the prompt `ids`
    and meta.json (greedy next id, temperature-0.8 top 5, the greedy path `new` with its
    margins, and `extra`). Returns capture()'s manual-vs-HF differences."""
    d = os.path.join(REF_DIR, name, pname)
    os.makedirs(d, exist_ok=True)
    arrays, diffs = capture(model, ids)
    for k, a in arrays.items():
        save_npy(os.path.join(d, f"{k}.npy"), a)
    last = torch.from_numpy(arrays["logits"][-1].copy())
    # In float64: torch's float32 softmax over 50257 logits carries a summation error
    # of up to ~1.3e-5 relative (seen on odd/hello: 0.5724306 vs the exact 0.5724233),
    # more than checkpoint 11's 1e-6 tolerance. The f32 logits are exact inputs.
    probs = torch.softmax(last.double() / 0.8, dim=-1)
    top = torch.topk(probs, 5)
    meta = {
        "model": name, "prompt": pname, "prompt_text": PROMPTS[pname], "prompt_ids": ids,
        "greedy_next": int(torch.argmax(last)),
        "top5_t08": {"ids": [int(i) for i in top.indices], "probs": [float(p) for p in top.values]},
        "greedy_24": new,
        "greedy_margins": margins,
        "min_margin": min(margins),
        **(extra or {}),
    }
    assert meta["greedy_next"] == new[0]
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    return diffs


# ---------------------------------------------------------------------------
# the trained demo model (models/default, scripts/train_demo.py)
# ---------------------------------------------------------------------------
DEMO_DIR = "models/default"
DEMO_PROMPTS = {"genesis": "In the beginning", "gospel": "And Jesus said unto them,"}
DEMO_NEW = 64
# (window, stride): the model's whole context with the default stride, and smaller windows
# so that the text spans several of them.
DEMO_PPL_CASES = [(512, 256), (128, 64), (100, 100), (200, 50)]
# The first held-out chapter of train_demo.py's split.
DEMO_PPL_CHAPTER = 19


@torch.no_grad()
def demo_continuation(model, prompt_ids):
    """DEMO_NEW greedy ids (plain argmax, end-of-text included) through the KV cache, with
    each step's chosen logprob and top 5, log-softmax in float64 over the f32 logits."""
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    ids, logprobs, top5, margins = [], [], [], []
    for _ in range(DEMO_NEW):
        logits = out.logits[0, -1]
        lp = torch.log_softmax(logits.double(), dim=-1)
        top = torch.topk(logits, 5)
        nxt = int(top.indices[0])
        ids.append(nxt)
        logprobs.append(float(lp[nxt]))
        top5.append([{"id": int(i), "logprob": float(lp[i])} for i in top.indices])
        margins.append(float(top.values[0] - top.values[1]))
        out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    full = torch.tensor([prompt_ids + ids[:-1]])
    nocache = model(full, use_cache=False).logits[0, len(prompt_ids) - 1:].argmax(-1).tolist()
    assert nocache == ids, "KV-cache greedy path differs from no-cache forward"
    return dict(ids=ids, logprobs=logprobs, top5=top5, margins=margins, min_margin=min(margins))


def write_demo(prompts):
    import train_demo  # scripts/, beside this file

    d = os.path.join(ROOT, DEMO_DIR)
    model = GPT2LMHeadModel.from_pretrained(d, torch_dtype=torch.float32, attn_implementation="eager").eval()
    name_in_config = model.config.llorch_model_name
    tok = Tokenizer.from_file(TOKENIZER)
    out = os.path.join(REF_DIR, "demo")
    summary = []
    for pname, ids in prompts.items():
        new, margins, raw = greedy(model, ids)
        assert new == raw, f"demo/{pname}: generate() deviates from the raw argmax (EOS?)"
        assert min(margins) >= MIN_MARGIN, f"demo/{pname}: near-tie in the greedy path {min(margins)}"
        notes = {"notes": check_varied(new, margins, raw)}
        diffs = write_prompt_reference("demo", model, pname, ids, new, margins, notes)
        summary.append(("demo", pname, new, min(margins), diffs))

    cont = []
    for pname, text in DEMO_PROMPTS.items():
        ids = tok.encode(text, add_special_tokens=False).ids
        c = demo_continuation(model, ids)
        assert c["min_margin"] >= MIN_MARGIN, f"demo continuation {pname}: near-tie {c['min_margin']}"
        decoded = tok.decode(c["ids"])
        cont.append({"name": pname, "text": text, "prompt_ids": ids, **c, "decoded": decoded})
        print(f"demo {pname}: {text!r} -> {decoded!r}")
    with open(os.path.join(out, "continuation.json"), "w") as f:
        json.dump({"model": DEMO_DIR, "new_tokens": DEMO_NEW, "greedy": "argmax of the raw logits, end-of-text included",
                   "logprobs": "log_softmax in float64 of the float32 logits", "prompts": cont}, f, indent=1)
        f.write("\n")

    _, chapters, _, _ = train_demo.corpus()
    heading, verses = chapters[DEMO_PPL_CHAPTER]
    assert DEMO_PPL_CHAPTER % train_demo.HELD_OUT_EVERY == train_demo.HELD_OUT_EVERY - 1, "not held out"
    text = train_demo.chapter_text(heading, verses)
    pd = os.path.join(out, "perplexity")
    os.makedirs(pd, exist_ok=True)
    with open(os.path.join(pd, "text.txt"), "w") as f:
        f.write(text)
    ids = np.array(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    cases = []
    for window, stride in DEMO_PPL_CASES:
        total, count, windows = train_demo.sliding_nll(model, ids, window, stride)
        cases.append(dict(window=window, stride=stride, windows=windows, scored=count, nll_sum=total,
                          mean_nll=total / count, perplexity=math.exp(total / count)))
        print(f"demo perplexity window {window} stride {stride}: {math.exp(total / count):.4f} ({windows} windows)")
    with open(os.path.join(pd, "reference.json"), "w") as f:
        json.dump({"text": "text.txt", "chapter": heading, "tokens": int(len(ids)),
                   "definition": "llorch_engine::perplexity / train_demo.sliding_nll", "cases": cases}, f, indent=1)
        f.write("\n")
    return {
        "name": "demo", "path": DEMO_DIR, "llorch_model_name": name_in_config,
        "trained_by": "scripts/train_demo.py", "n_layer": model.config.n_layer, "n_head": model.config.n_head,
        "n_embd": model.config.n_embd, "n_positions": model.config.n_positions, "storage_dtype": "F16",
        "layout": "save_pretrained", "summary": summary,
    }


# ---------------------------------------------------------------------------
def evaluate(name, seed, prompts):
    model = build_model(name, seed)
    res = {}
    for pname, ids in prompts.items():
        new, margins, raw = greedy(model, ids)
        res[pname] = (new, margins, check_varied(new, margins, raw))
    return model, res


def search(n):
    prompts = tokenize_prompts()
    for name in MODELS:
        good = []
        for seed in range(n):
            _, res = evaluate(name, seed, prompts)
            probs = [p for r in res.values() for p in r[2]]
            mm = min(min(r[1]) for r in res.values())
            if not probs:
                good.append((seed, mm))
                print(f"{name} seed {seed}: OK min_margin={mm:.4f}", flush=True)
            else:
                print(f"{name} seed {seed}: {probs}", flush=True)
        print(f"{name}: good seeds {good}")


def tokenize_prompts():
    tok = Tokenizer.from_file(TOKENIZER)
    prompts = {k: tok.encode(v, add_special_tokens=False).ids for k, v in PROMPTS.items()}
    assert prompts["hello"] == [15496, 13], prompts["hello"]
    assert 9 <= len(prompts["long"]) <= 12, prompts["long"]
    return prompts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--search", type=int, default=0, help="try seeds 0..N-1 and report (writes nothing)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.search:
        return search(args.search)

    prompts = tokenize_prompts()
    manifest = {
        "generator": "scripts/gen_reference.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "numpy": np.__version__, "safetensors": safetensors.__version__},
        "tokenizer": "models/default/tokenizer.json",
        "prompts": {k: {"text": PROMPTS[k], "ids": v} for k, v in prompts.items()},
        "greedy_new_tokens": N_NEW,
        "top5_temperature": 0.8,
        "weight_scales": SCALES,
        "models": [],
        "files": {
            "ln1.npy": "(T,C) block 0 ln_1(wte[ids]+wpe[pos])",
            "q.npy/k.npy/v.npy": "(T,C) block 0 c_attn output columns [0,C),[C,2C),[2C,3C)",
            "att_scores.npy": "(NH,T,T) block 0 Q.K^T/sqrt(head_dim), causal mask -> -inf, pre-softmax",
            "attn_out.npy": "(T,C) block 0 attention output after c_proj, before residual",
            "mlp_in.npy": "(T,C) block 0 ln_2 output",
            "mlp_out.npy": "(T,C) block 0 MLP output (c_fc -> gelu_new -> c_proj)",
            "block0_out.npy": "(T,C) block 0 output incl. both residuals",
            "logits.npy": "(T,V) final logits (ln_f, lm head tied to wte)",
        },
    }
    summary = []
    for name, spec in MODELS.items():
        seed = spec["seed"]
        model, res = evaluate(name, seed, prompts)
        for pname, (new, margins, problems) in res.items():
            assert not problems, f"{name}/{pname} seed {seed}: {problems}"

        out_dir = os.path.join(ROOT, spec["dir"])
        if spec["layout"] == "save_pretrained":
            write_save_pretrained(model, out_dir)
        else:
            write_hub_layout(model, out_dir)
        reload_check(name, model, prompts["long"])

        cfg = model.config
        manifest["models"].append({
            "name": name, "path": spec["dir"], "seed": seed,
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
            "n_inner": cfg.n_inner, "n_positions": cfg.n_positions, "vocab_size": cfg.vocab_size,
            "activation_function": cfg.activation_function, "layer_norm_epsilon": cfg.layer_norm_epsilon,
            "storage_dtype": spec["storage_dtype"], "layout": spec["layout"],
        })

        for pname, ids in prompts.items():
            new, margins, _ = res[pname]
            diffs = write_prompt_reference(name, model, pname, ids, new, margins)
            summary.append((name, pname, new, min(margins), diffs))

    demo = write_demo(prompts)
    manifest["models"].append(demo)
    summary += demo.pop("summary")

    with open(os.path.join(REF_DIR, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")

    # ---- summary ----
    print("== tensors ==")
    for name, spec in MODELS.items():
        p = os.path.join(ROOT, spec["dir"], "model.safetensors")
        lst = tensor_listing(p)
        print(f"{spec['dir']}/model.safetensors: {len(lst)} tensors, dtypes {sorted({d for _, d, _ in lst})}")
        for k, dt, shp in lst[:4]:
            print(f"   {k} {dt} {shp}")
    print("== greedy ==")
    for name, pname, new, mm, diffs in summary:
        print(f"{name}/{pname}: min_margin={mm:.4f} distinct={len(set(new))} attn_diff={diffs['attn_manual_vs_hf']:.1e}")
        print(f"   {new}")
    print("== sizes ==")
    total = 0
    paths = [os.path.join(ROOT, s["dir"], f) for s in MODELS.values() for f in ("config.json", "model.safetensors")]
    paths += [os.path.join(ROOT, DEMO_DIR, "model.safetensors")]
    for dp, _, fns in os.walk(REF_DIR):
        paths += [os.path.join(dp, fn) for fn in fns]
    for p in sorted(paths):
        sz = os.path.getsize(p)
        total += sz
        if sz > 100_000:
            print(f"   {sz:>10}  {os.path.relpath(p, ROOT)}")
    print(f"   total {total} bytes ({total / 1e6:.2f} MB) in {len(paths)} files")


if __name__ == "__main__":
    sys.exit(main())
