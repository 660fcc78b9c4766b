#!/usr/bin/env python3
"""Reference values for the engine's sampling pipeline, from Hugging Face `transformers`.

Reads the committed `tiny` model (fixtures/models/tiny, written by gen_reference.py) and writes
fixtures/reference/sampling/ only; nothing else is touched.

  logits.npy      (V,) f32: the model's last-position logits for PROMPT + GENERATED, the
                  input of every processor case.
  <case>.npy      (V,) f32: that input after the case's processors (masked entries -inf).
  cases.json      the history (prompt ids, generated ids), each case's engine parameters and
                  the HF processors that produced it, with the margins that keep a float
                  rounding from flipping a top-p / min-p decision; and greedy continuations
                  (HF `generate`, KV cache) for each parameter set `generate` can express.

Processors (in the engine's order, which is HF `generate`'s and vLLM's):
  logit_bias          SequenceBiasLogitsProcessor with one-token sequences (checked equal to a
                      direct add)
  repetition_penalty  RepetitionPenaltyLogitsProcessor over prompt + generated
  frequency/presence  numpy, OpenAI's formula over the generated tokens only:
                      logits[j] - c[j]*frequency_penalty - (c[j] > 0)*presence_penalty (f32)
  temperature         TemperatureLogitsWarper
  top_k, top_p, min_p TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper

Usage (from the repo root):  python scripts/gen_sampling_reference.py
"""
import json
import os
import sys

import numpy as np
import torch
import transformers
from transformers import (
    GPT2LMHeadModel,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, "fixtures", "models", "tiny")
OUT_DIR = os.path.join(ROOT, "fixtures", "reference", "sampling")
EOS = 50256
N_NEW = 24
# Greedy continuations must not hinge on a near-tie (the engine's logits match HF's to ~1e-5).
MIN_MARGIN = 1e-3
# A top-p / min-p decision must not hinge on float rounding of the probabilities.
MIN_REL_MARGIN = 1e-4

# "The quick brown fox jumps over the lazy dog" (fixtures/reference/manifest.json, "long").
PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290]


def f32(x):
    return np.float32(x)


# ---------------------------------------------------------------------------
# processors
# ---------------------------------------------------------------------------
class OpenAIPenalties(LogitsProcessor):
    """OpenAI presence/frequency penalties over the tokens generated after the prompt."""

    def __init__(self, prompt_len, presence, frequency):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        out = []
        for row, s in zip(input_ids, scores):
            gen = row[self.prompt_len:].numpy()
            out.append(torch.from_numpy(openai_penalties(s.numpy(), gen, self.presence, self.frequency)))
        return torch.stack(out)


def openai_penalties(logits, generated, presence, frequency):
    c = np.bincount(np.asarray(generated, dtype=np.int64), minlength=logits.shape[-1]).astype(np.float32)
    out = logits - c * f32(frequency) - (c > 0).astype(np.float32) * f32(presence)
    assert out.dtype == np.float32
    return out


def pipeline(params, prompt, generated, logits):
    """Applies `params` (engine names) to `logits` (V,) f32 with HF processors / numpy."""
    ids = torch.tensor([prompt + generated], dtype=torch.long)
    x = torch.from_numpy(logits.copy()).unsqueeze(0)
    used = []
    if params.get("logit_bias"):
        bias = {int(k): v for k, v in params["logit_bias"].items()}
        proc = SequenceBiasLogitsProcessor(sequence_bias=[[[k], v] for k, v in bias.items()])
        y = proc(ids, x)
        direct = x.numpy().copy()
        for k, v in bias.items():
            direct[0, k] += f32(v)
        assert np.array_equal(y.numpy(), direct), "SequenceBias differs from a direct add"
        x = y
        used.append("SequenceBiasLogitsProcessor")
    if params.get("repetition_penalty", 1.0) != 1.0:
        x = RepetitionPenaltyLogitsProcessor(params["repetition_penalty"])(ids, x)
        used.append("RepetitionPenaltyLogitsProcessor")
    if params.get("presence_penalty", 0.0) or params.get("frequency_penalty", 0.0):
        p, f = params.get("presence_penalty", 0.0), params.get("frequency_penalty", 0.0)
        x = torch.from_numpy(openai_penalties(x[0].numpy(), generated, p, f)).unsqueeze(0)
        used.append("numpy OpenAI presence/frequency")
    if params.get("temperature", 1.0) != 1.0:
        x = TemperatureLogitsWarper(params["temperature"])(ids, x)
        used.append("TemperatureLogitsWarper")
    if params.get("top_k", 0):
        x = TopKLogitsWarper(params["top_k"])(ids, x)
        used.append("TopKLogitsWarper")
    margins = {}
    if params.get("top_p", 1.0) < 1.0:
        margins["top_p"] = top_p_margin(x[0].numpy(), params["top_p"])
        x = TopPLogitsWarper(params["top_p"])(ids, x)
        used.append("TopPLogitsWarper")
    if params.get("min_p", 0.0) > 0.0:
        margins["min_p"] = min_p_margin(x[0].numpy(), params["min_p"])
        x = MinPLogitsWarper(params["min_p"])(ids, x)
        used.append("MinPLogitsWarper")
    out = x[0].numpy().astype(np.float32)
    return out, used, margins


def top_p_margin(z, top_p):
    """Relative distance of top_p from the two cumulative masses around the cut (float64)."""
    z = z.astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    cum = np.cumsum(np.sort(p)[::-1])
    keep = int(np.searchsorted(cum, top_p)) + 1  # first prefix whose mass reaches top_p
    near = [cum[keep - 1]] + ([cum[keep - 2]] if keep >= 2 else [])
    m = min(abs(c - top_p) / top_p for c in near)
    assert m >= MIN_REL_MARGIN, f"top_p {top_p}: cut within {m:.2e} of a cumulative mass"
    return {"kept": keep, "min_rel_margin": m}


def min_p_margin(z, min_p):
    """Relative distance of min_p from every finite token's p / p_max (float64)."""
    z = z.astype(np.float64)
    r = np.exp(z[np.isfinite(z)] - z.max())
    m = float(np.min(np.abs(r - min_p)) / min_p)
    assert m >= MIN_REL_MARGIN, f"min_p {min_p}: a token within {m:.2e} of the floor"
    return {"kept": int((r >= min_p).sum()), "min_rel_margin": m}


def with_safe_cuts(params, generated, logits):
    """`params` with top_p / min_p moved to the nearest value on a grid of exact binary
    fractions (the same in f32, f64 and Python) whose decisions have the margins above."""
    params = dict(params)
    for key, step in (("top_p", 1 / 1024), ("min_p", 1 / 4096)):
        if key not in params:
            continue
        want = params[key]
        grid = sorted((k * step for k in range(1, int(1 / step))), key=lambda v: (abs(v - want), v))
        for v in grid[:400]:
            try:
                pipeline({**params, key: v}, PROMPT, generated, logits)
            except AssertionError:
                continue
            params[key] = v
            break
        else:
            raise SystemExit(f"no safe {key} near {want}")
    return params


# ---------------------------------------------------------------------------
# greedy continuations
# ---------------------------------------------------------------------------
@torch.no_grad()
def hf_greedy(model, prompt, params, stop_ids=(), ignore_eos=False):
    inp = torch.tensor([prompt], dtype=torch.long)
    kw = dict(do_sample=False, num_beams=1, max_new_tokens=N_NEW, pad_token_id=EOS,
              return_dict_in_generate=True, output_scores=True)
    procs = LogitsProcessorList()
    if params.get("logit_bias"):
        kw["sequence_bias"] = [[[int(k)], v] for k, v in params["logit_bias"].items()]
    if params.get("repetition_penalty", 1.0) != 1.0:
        kw["repetition_penalty"] = params["repetition_penalty"]
    if params.get("presence_penalty", 0.0) or params.get("frequency_penalty", 0.0):
        procs.append(OpenAIPenalties(len(prompt), params.get("presence_penalty", 0.0),
                                     params.get("frequency_penalty", 0.0)))
    # ignore_eos: no eos_token_id at all (EOS is generated and streamed like any token);
    # stop ids: added to eos_token_id (generation ends after emitting one).
    eos = ([] if ignore_eos else [EOS]) + list(stop_ids)
    kw["eos_token_id"] = eos or None
    out = model.generate(inp, attention_mask=torch.ones_like(inp), logits_processor=procs, **kw)
    new = out.sequences[0, len(prompt):].tolist()
    margins = []
    for s in out.scores:  # processed scores, one (1, V) per step
        top2 = torch.topk(s[0].float(), 2)
        margins.append(float(top2.values[0] - top2.values[1]))
        assert int(top2.indices[0]) == new[len(margins) - 1]
    return new, margins


def finish_of(new, stop_ids, ignore_eos):
    last = new[-1]
    if last == EOS and not ignore_eos:
        return "EOS"
    if last in stop_ids:
        return "STOP_TOKEN"
    assert len(new) == N_NEW
    return "LENGTH"


def greedy_case(model, name, params, stop_ids=(), ignore_eos=False):
    new, margins = hf_greedy(model, PROMPT, params, stop_ids, ignore_eos)
    assert min(margins) >= MIN_MARGIN, f"{name}: min margin {min(margins):.2e}"
    return {
        "name": name, "prompt_ids": PROMPT, "params": params,
        "max_new_tokens": N_NEW, "stop_token_ids": list(stop_ids), "ignore_eos": ignore_eos,
        "ids": new, "finish": finish_of(new, stop_ids, ignore_eos),
        "margins": margins, "min_margin": min(margins),
    }


# ---------------------------------------------------------------------------
def main():
    torch.set_num_threads(1)
    model = GPT2LMHeadModel.from_pretrained(MODEL_DIR, torch_dtype=torch.float32,
                                            attn_implementation="eager").eval()
    with open(os.path.join(ROOT, "fixtures", "reference", "tiny", "long", "meta.json")) as f:
        meta = json.load(f)
    assert meta["prompt_ids"] == PROMPT

    # The history of the processor cases: the plain greedy path, then a few repeats so the
    # frequency penalty sees counts above one.
    plain, _ = hf_greedy(model, PROMPT, {})
    assert plain == meta["greedy_24"], "fixtures/models/tiny no longer gives the committed greedy path"
    generated = plain[:10] + [plain[2], plain[2], plain[5]]
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + generated]), use_cache=False).logits[0, -1].numpy()
    logits = np.ascontiguousarray(logits.astype("<f4"))
    top = [int(i) for i in np.argsort(-logits, kind="stable")[:8]]

    # Biases on tokens that matter: the top token down, the 5th up, EOS up, id 1 banned (HF
    # refuses id 0 in sequence_bias).
    bias = {str(top[0]): -5.0, str(top[4]): 8.0, str(EOS): 3.5, "1": -100.0}
    # Milder, for the whole pipeline, so that several tokens survive every cut.
    mild_bias = {str(top[0]): -1.0, str(top[4]): 1.5, str(EOS): 3.5, "1": -100.0}
    cases = [
        ("logit_bias", {"logit_bias": bias}),
        ("repetition_penalty_1.3", {"repetition_penalty": 1.3}),
        ("repetition_penalty_0.7", {"repetition_penalty": 0.7}),
        ("frequency_penalty_0.6", {"frequency_penalty": 0.6}),
        ("presence_penalty_1.1", {"presence_penalty": 1.1}),
        ("negative_penalties", {"presence_penalty": -0.5, "frequency_penalty": -0.3}),
        ("temperature_0.7", {"temperature": 0.7}),
        ("top_k_40", {"top_k": 40}),
        ("top_p", {"top_p": 0.9}),
        ("min_p", {"min_p": 0.05}),
        ("all", {"logit_bias": mild_bias, "repetition_penalty": 1.2, "presence_penalty": 0.4,
                 "frequency_penalty": 0.3, "temperature": 0.8, "top_k": 60, "top_p": 0.85,
                 "min_p": 0.02}),
    ]
    os.makedirs(OUT_DIR, exist_ok=True)
    np.save(os.path.join(OUT_DIR, "logits.npy"), logits, allow_pickle=False)
    out_cases = []
    for name, params in cases:
        params = with_safe_cuts(params, generated, logits)
        out, used, margins = pipeline(params, PROMPT, generated, logits)
        changed = int(np.sum(out != logits))
        assert changed > 0, f"{name} changes nothing"
        np.save(os.path.join(OUT_DIR, f"{name}.npy"), np.ascontiguousarray(out.astype("<f4")), allow_pickle=False)
        out_cases.append({"name": name, "file": f"{name}.npy", "params": params, "hf": used,
                          "changed": changed, "finite": int(np.isfinite(out).sum()),
                          "argmax": int(np.argmax(out)), "margins": margins})

    # Greedy continuations.
    greedy = [
        greedy_case(model, "plain", {}),
        greedy_case(model, "repetition_penalty_1.3", {"repetition_penalty": 1.3}),
        greedy_case(model, "logit_bias", {"logit_bias": {str(plain[0]): -4.0, str(plain[7]): 2.5}}),
        greedy_case(model, "presence_frequency", {"presence_penalty": 0.7, "frequency_penalty": 0.4}),
        greedy_case(model, "negative_presence_frequency", {"presence_penalty": -0.3, "frequency_penalty": -0.2}),
    ]
    # A stop id: the plain path's 6th token, which does not occur before it.
    stop = plain[5]
    assert stop not in plain[:5] and stop != EOS
    greedy.append(greedy_case(model, "stop_token_ids", {}, stop_ids=(stop,)))
    assert greedy[-1]["ids"] == plain[:6] and greedy[-1]["finish"] == "STOP_TOKEN"
    # EOS made likely with a bias: the smallest bias on a 0.25 grid whose path reaches EOS at
    # step 3 or later; then the same with ignore_eos (EOS streamed, generation goes on).
    for b in np.arange(0.25, 40.0, 0.25):
        eos_bias = {"logit_bias": {str(EOS): float(b)}}
        new, margins = hf_greedy(model, PROMPT, eos_bias, ignore_eos=True)
        if EOS in new[3:] and EOS not in new[:3] and min(margins) >= MIN_MARGIN and new.count(EOS) < N_NEW // 2:
            break
    else:
        raise SystemExit("no bias makes EOS appear")
    with_eos = greedy_case(model, "eos_bias_stops_at_eos", eos_bias)
    ignoring = greedy_case(model, "eos_bias_ignore_eos", eos_bias, ignore_eos=True)
    assert with_eos["finish"] == "EOS" and ignoring["finish"] == "LENGTH"
    assert ignoring["ids"][:len(with_eos["ids"])] == with_eos["ids"]
    # ignore_eos with EOS listed as a stop id stops there again.
    stop_eos = greedy_case(model, "eos_bias_ignore_eos_eos_in_stop_ids", eos_bias,
                           stop_ids=(EOS,), ignore_eos=True)
    assert stop_eos["ids"] == with_eos["ids"] and stop_eos["finish"] == "STOP_TOKEN"
    greedy += [with_eos, ignoring, stop_eos]
    for g in greedy[1:]:
        if g["name"] not in ("stop_token_ids", "eos_bias_ignore_eos_eos_in_stop_ids"):
            assert g["ids"] != plain[:len(g["ids"])] or g["finish"] != "LENGTH", f"{g['name']} changes nothing"

    doc = {
        "generator": "scripts/gen_sampling_reference.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "numpy": np.__version__},
        "model": "fixtures/models/tiny",
        "eos_token_id": EOS,
        "order": ["logit_bias", "repetition_penalty", "frequency_penalty", "presence_penalty",
                  "temperature", "top_k", "top_p", "min_p"],
        "processors": {
            "prompt_ids": PROMPT, "generated_ids": generated, "input": "logits.npy",
            "note": "every case applies its params to logits.npy with history prompt_ids + "
                    "generated_ids; presence/frequency count generated_ids only; masked = -inf",
            "cases": out_cases,
        },
        "greedy": greedy,
    }
    with open(os.path.join(OUT_DIR, "cases.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")

    for c in out_cases:
        print(f"{c['name']:>24}: changed {c['changed']:>5} finite {c['finite']:>5} argmax {c['argmax']} {c['margins']}")
    for g in greedy:
        print(f"{g['name']:>36}: {g['finish']:<10} min_margin {g['min_margin']:.4f} {g['ids']}")


if __name__ == "__main__":
    sys.exit(main())
