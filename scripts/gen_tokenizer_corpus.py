#!/usr/bin/env python3
"""Generate the GPT-2 tokenizer conformance corpus.

Writes fixtures/tokenizer/corpus.json: a deterministic list of strings
(hand-written cases + seeded random cases, random.Random(1234)) together with
the ids produced by the HuggingFace `tokenizers` library for the real GPT-2
tokenizer in models/default/tokenizer.json, and the decoded text.

    encode(text, add_special_tokens=False).ids
    decode(ids, skip_special_tokens=False)

`<|endoftext|>` is an added special token in tokenizer.json, so HF matches it
literally inside text (-> id 50256); the corpus records whatever HF gives.

Usage (from the repo root):  python scripts/gen_tokenizer_corpus.py
"""
import json
import os
import random
import sys

import tokenizers
from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "models", "default", "tokenizer.json")
OUT = os.path.join(ROOT, "fixtures", "tokenizer", "corpus.json")


def hand_written():
    c = []

    def add(name, text):
        c.append((name, text))

    # --- empty / trivial ---
    add("empty", "")
    add("single_space", " ")
    add("single_char_a", "a")
    add("hello_world", "Hello, world!")
    add("hello_period", "Hello.")
    add("hello_lower", "hello")
    add("hello_leading_space", " Hello")

    # --- ASCII prose ---
    prose = [
        "The quick brown fox jumps over the lazy dog.",
        "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness.",
        "Call me Ishmael. Some years ago—never mind how long precisely—having little or no money in my purse...",
        "To be, or not to be: that is the question.",
        "In 1492, Columbus sailed the ocean blue; in 1969, Apollo 11 landed on the Moon.",
        "She sells sea-shells by the sea-shore (allegedly).",
        "ALL CAPS SENTENCE WITH SOME PUNCTUATION!!! REALLY???",
        "mIxEd CaSe WoRdS aNd camelCase and snake_case and kebab-case",
        "Email me at someone@example.com or visit https://example.org/path?q=1&r=two#frag",
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et dolore magna aliqua.",
        "A sentence ending without punctuation",
        "Quotes: \"double\", 'single', `backtick`, «guillemets», „German“, “curly”.",
        "Punctuation soup: !@#$%^&*()_+-=[]{}|;:,.<>/?~",
        "... ellipsis, -- dashes --- and ... more!?",
        "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
        "The year 2024 had 366 days.",
    ]
    for i, p in enumerate(prose):
        add(f"prose_{i:02d}", p)

    # --- contractions ---
    contr = [
        "don't", "Don't", "DON'T", "I'm", "I'M", "we'll", "We'LL", "they've",
        "she'd", "it's", "It's", "you're", "YOU'RE", "can't won't shouldn't",
        "'s 't 're 've 'm 'll 'd", "rock'n'roll", "o'clock", "l'été", "ma'am",
        "the dog's bone's owner's", "'quoted'", "x'S y'T z'Re",
    ]
    for i, t in enumerate(contr):
        add(f"contraction_{i:02d}", t)

    # --- whitespace ---
    ws = [
        ("two_spaces", "a  b"),
        ("many_spaces", "a          b"),
        ("leading_spaces", "   leading spaces"),
        ("trailing_spaces", "trailing spaces   "),
        ("only_spaces", "     "),
        ("tab", "a\tb"),
        ("tabs_run", "\t\t\tindented\t\t"),
        ("newline", "line1\nline2"),
        ("newlines_run", "para1\n\n\npara2\n"),
        ("crlf", "line1\r\nline2\r\n"),
        ("cr_only", "a\rb\rc"),
        ("mixed_ws", " \t \n \r\n  x  \n\t "),
        ("only_newlines", "\n\n\n\n"),
        ("space_newline_space", "word \n word"),
        ("trailing_newline_spaces", "end.\n   "),
        ("nbsp", "non\u00a0breaking\u00a0space"),
        ("unicode_spaces", "em\u2003space en\u2002space thin\u2009space ideographic\u3000space"),
        ("zero_width", "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom"),
        ("vertical_tab_ff", "a\x0bb\x0cc"),
        ("line_sep", "a\u2028b\u2029c\x85d"),
        ("spaces_before_punct", "wait   ...   what   ?"),
        ("spaces_digits", "  123   456  "),
    ]
    for n, t in ws:
        add("ws_" + n, t)

    # --- control characters ---
    ctrl = [
        ("nul", "\x00"),
        ("nul_in_text", "a\x00b\x00c"),
        ("bell", "ring\x07ring"),
        ("escape_ansi", "\x1b[31mred\x1b[0m normal"),
        ("del", "del\x7fete"),
        ("all_c0", "".join(chr(i) for i in range(32))),
        ("c1", "".join(chr(i) for i in range(0x80, 0xA0))),
        ("ctrl_mix", "\x01\x02 \x03text\x04\x7f\x1b "),
    ]
    for n, t in ctrl:
        add("ctrl_" + n, t)

    # --- unicode scripts ---
    uni = [
        ("cjk_zh", "我爱自然语言处理。今天天气很好！"),
        ("cjk_ja", "こんにちは、世界。カタカナとひらがなと漢字。"),
        ("korean", "안녕하세요, 세계! 한국어 문장입니다."),
        ("cyrillic", "Привет, мир! Съешь же ещё этих мягких французских булок."),
        ("arabic", "مرحبا بالعالم! هذه جملة باللغة العربية."),
        ("hebrew", "שלום עולם! זה משפט בעברית."),
        ("devanagari", "नमस्ते दुनिया! यह हिन्दी वाक्य है।"),
        ("thai", "สวัสดีชาวโลก ภาษาไทยไม่มีช่องว่างระหว่างคำ"),
        ("greek", "Γειά σου Κόσμε! Ξεσκεπάζω την ψυχοφθόρα βδελυγμία."),
        ("greek_upper", "ΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩ"),
        ("latin_ext", "Ærøskøbing, Straße, façade, naïve, Œuvre, Ångström, Łódź"),
        ("vietnamese", "Tiếng Việt có dấu: Xin chào thế giới."),
        ("armenian_georgian", "Բարեւ աշխարհ ႠႡႢ გამარჯობა"),
        ("ethiopic", "ሰላም ለዓለም"),
        ("tamil_bengali", "வணக்கம் উলম্ব নমস্কার"),
        ("math_symbols", "∀x∈ℝ: x² ≥ 0 ∧ ∑ᵢ aᵢ ≤ ∫₀^∞ f(t) dt ≠ ∅ → ∞"),
        ("currency", "€100 £50 ¥1000 ₹200 ₿0.5 $9.99 ¢"),
        ("fullwidth", "ＦＵＬＬＷＩＤＴＨ　ｔｅｘｔ １２３"),
        ("astral_math", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕯𝖔𝖚𝖇𝖑𝖊 𝟘𝟙𝟚"),
        ("mixed_scripts", "English, русский, 中文, العربية, עברית, हिन्दी, ไทย, Ελληνικά, 한국어"),
        ("rtl_marks", "abc\u200fאבג\u200edef\u202eevil\u202c"),
        ("box_drawing", "┌──┐\n│hi│\n└──┘"),
    ]
    for n, t in uni:
        add("unicode_" + n, t)

    # --- emoji ---
    emoji = [
        ("simple", "I love 🦀 and 🐍! 😀😃😄"),
        ("zwj_family", "👩\u200d👩\u200d👧\u200d👦"),
        ("zwj_rainbow_flag", "🏳\ufe0f\u200d🌈"),
        ("zwj_misc", "👨\u200d💻 🧑\u200d🚀 🐻\u200d❄\ufe0f ❤\ufe0f\u200d🔥"),
        ("skin_tones", "👍🏻 👍🏼 👍🏽 👍🏾 👍🏿"),
        ("flags", "🇺🇸🇬🇧🇯🇵🇩🇪🇫🇷 🇺🇳"),
        ("subdivision_flag", "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"),
        ("keycaps", "1\ufe0f\u20e3 #\ufe0f\u20e3 *\ufe0f\u20e3"),
        ("variation_selectors", "☺ ☺\ufe0f ☺\ufe0e ✔\ufe0f"),
        ("emoji_in_text", "Shipped it 🚀🚀🚀 — all tests green ✅"),
        ("emoji_run", "😀" * 17),
    ]
    for n, t in emoji:
        add("emoji_" + n, t)

    # --- combining marks ---
    comb = [
        ("e_acute_decomposed", "e\u0301"),
        ("precomposed_vs_decomposed", "caf\u00e9 vs cafe\u0301"),
        ("multiple_marks", "a\u0300\u0301\u0302\u0303\u0304"),
        ("hangul_jamo", "\u1100\u1161\u11a8"),
        ("devanagari_marks", "क\u094d\u0937"),
        ("zalgo", "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324\u031e\u0349\u035a\u032f\u031e\u0320\u034dA\u036b\u0357\u0334\u0362\u0335\u031c\u0330\u0354L\u0368\u0367\u0369\u0358\u0320G\u0311\u0357\u030e\u0305\u035b\u0341\u0334\u033b\u0348\u034d\u0354\u0339O\u0342\u030c\u030c\u0358\u0328\u0335\u0339\u033b\u031d\u0333!"),
        ("lone_combining", "\u0301\u0302 start"),
    ]
    for n, t in comb:
        add("combining_" + n, t)

    # --- code ---
    code = [
        ("rust", 'fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * 2).collect();\n    println!("{:?}", v);\n}\n'),
        ("rust_generics", "impl<T: Clone + Send + 'static> Foo<T> for Bar<'a, T> where T: Debug {}"),
        ("python", 'def fib(n: int) -> int:\n    """Return n-th Fibonacci."""\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n'),
        ("python_tabs", "class A:\n\tdef f(self):\n\t\treturn {'k': [1, 2.5, None]}\n"),
        ("json", '{"name": "llorch", "version": 1, "nested": {"list": [1, -2, 3.5e10, true, null], "s": "\\u00e9\\n"}}'),
        ("html", '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Hi &amp; bye</title></head>\n<body><p class="x">Hello&nbsp;<b>world</b></p></body></html>'),
        ("shell", "for f in *.rs; do echo \"$f\" | sed -e 's/a/b/g' >> out.txt; done && exit 0"),
        ("c_like", "int main(void){int x=0x1F;x<<=2;x^=~x;return x!=0?x:-1;}//comment /* block */"),
        ("sql", "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%son' ORDER BY id DESC;"),
        ("regex", r"^(?:[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*)@\d{1,3}$"),
        ("indent_4_8_12", "a\n    b\n        c\n            d\n"),
        ("markdown", "# Title\n\n* item **bold** _it_\n\n```rust\nlet x = 1;\n```\n"),
    ]
    for n, t in code:
        add("code_" + n, t)

    # --- numbers ---
    nums = [
        ("long_digits", "12345678901234567890123456789012345678901234567890"),
        ("pi", "3.14159265358979323846264338327950288419716939937510"),
        ("negative", "-42 -0.001 -1e-10 +7"),
        ("decimals", "0.5 .5 5. 1,000,000.00 1.000.000,00"),
        ("mixed_alnum", "abc123def456 x86_64 H2O COVID-19 v1.2.3-rc.4"),
        ("dates_times", "2024-02-29T23:59:59.999Z 12:30pm 1/2/2003"),
        ("phone_ids", "+1 (555) 123-4567, ID#000042, 0xDEADBEEF, 0b1010, 0o777"),
        ("unicode_digits", "٠١٢٣٤٥٦٧٨٩ ०१२३४५६७८९ ①②③ ½ ¾ Ⅻ"),
        ("number_spaces", "1 2 3  4   5    6"),
    ]
    for n, t in nums:
        add("number_" + n, t)

    # --- <|endoftext|> ---
    eot = [
        ("alone", "<|endoftext|>"),
        ("in_text", "Hello<|endoftext|>World"),
        ("spaced", "end of doc. <|endoftext|> Start of next"),
        ("double", "<|endoftext|><|endoftext|>"),
        ("newlines", "a\n<|endoftext|>\nb"),
        ("partial", "<|endoftext| <|endof text|> <endoftext> |endoftext|"),
        ("case", "<|ENDOFTEXT|> <|EndOfText|>"),
        ("nested", "<|<|endoftext|>|>"),
    ]
    for n, t in eot:
        add("eot_" + n, t)

    return c


def seeded(rng):
    c = []
    # random valid scalar values from assorted ranges (no surrogates)
    ranges = [
        (0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF),
        (0x590, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F), (0x1100, 0x11FF),
        (0x2000, 0x206F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
        (0xE000, 0xF8FF), (0xFB00, 0xFFFF), (0x10000, 0x1FFFF), (0x1F300, 0x1FAFF),
        (0x20000, 0x2FFFF), (0xE0000, 0xE007F), (0xF0000, 0x10FFFF),
    ]

    def scalar():
        while True:
            lo, hi = rng.choice(ranges)
            cp = rng.randint(lo, hi)
            if not (0xD800 <= cp <= 0xDFFF):
                return chr(cp)

    for i in range(40):
        n = rng.randint(1, 40)
        c.append((f"random_unicode_{i:02d}", "".join(scalar() for _ in range(n))))

    # uniformly random scalar values over the whole code space
    for i in range(15):
        n = rng.randint(1, 24)
        s = []
        while len(s) < n:
            cp = rng.randint(0, 0x10FFFF)
            if not (0xD800 <= cp <= 0xDFFF):
                s.append(chr(cp))
        c.append((f"random_scalar_{i:02d}", "".join(s)))

    # random byte-ish strings: latin-1 range (each maps to 1-2 UTF-8 bytes)
    for i in range(15):
        n = rng.randint(1, 48)
        c.append((f"random_latin1_{i:02d}", "".join(chr(rng.randint(0, 0xFF)) for _ in range(n))))

    # random ASCII soup incl. whitespace/punctuation/contraction fragments
    atoms = ["a", "Z", "9", " ", "  ", "\t", "\n", "\r\n", "'", "'s", "'ll", "'M", ".", ",", "!",
             "-", "_", "<|endoftext|>", "é", "😀", "中", "  \n", "0", "123", "word", " word"]
    for i in range(30):
        n = rng.randint(1, 30)
        c.append((f"random_atoms_{i:02d}", "".join(rng.choice(atoms) for _ in range(n))))

    # random words with spaces
    words = ["the", "The", "of", "and", "to", "in", "is", "that", "it", "was", "for", "on", "are",
             "with", "as", "I", "his", "they", "be", "at", "one", "have", "this", "from", "Hello",
             "world", "GPT", "token", "tokenizer", "Rust", "inference", "llorch", "naïve", "日本",
             "Москва", "don't", "we'll", "42", "3.14", "😀"]
    for i in range(20):
        n = rng.randint(2, 40)
        seps = [" ", " ", " ", "  ", "\n", ", ", ". "]
        s = rng.choice(words)
        for _ in range(n - 1):
            s += rng.choice(seps) + rng.choice(words)
        c.append((f"random_words_{i:02d}", s))
    return c, words, atoms, scalar


def long_inputs(rng, words, atoms, scalar, hand):
    c = []
    # 1: ~20k chars of mixed text assembled from hand-written cases
    parts = []
    texts = [t for _, t in hand if t]
    while sum(len(p) for p in parts) < 20000:
        parts.append(rng.choice(texts))
        parts.append(rng.choice([" ", "\n", "\n\n", "  ", "\t", ""]))
    c.append(("long_mixed_20k", "".join(parts)[:20000]))
    # 2: ~8k chars of english-ish words
    s = []
    while sum(len(x) + 1 for x in s) < 8000:
        s.append(rng.choice(words[:33]))
    c.append(("long_words_8k", " ".join(s)))
    # 3: 3000 spaces then text (long whitespace run)
    c.append(("long_spaces_3k", " " * 3000 + "x" + " " * 3 + "\n" * 50))
    # 4: 2000 random scalars
    c.append(("long_random_unicode_2k", "".join(scalar() for _ in range(2000))))
    # 5: long digit run
    c.append(("long_digits_3k", "".join(str(rng.randint(0, 9)) for _ in range(3000))))
    # 6: repeated single letter (tests BPE merging of long identical runs)
    c.append(("long_aaaa_2k", "a" * 2000))
    return c


def main():
    tok = Tokenizer.from_file(TOKENIZER)
    rng = random.Random(1234)
    hand = hand_written()
    rnd, words, atoms, scalar = seeded(rng)
    longs = long_inputs(rng, words, atoms, scalar, hand)
    all_cases = hand + rnd + longs

    names = [n for n, _ in all_cases]
    assert len(names) == len(set(names)), "duplicate case names"
    for _, t in all_cases:
        for ch in t:
            assert not (0xD800 <= ord(ch) <= 0xDFFF)

    cases = []
    roundtrip_fail = []
    for name, text in all_cases:
        ids = tok.encode(text, add_special_tokens=False).ids
        decoded = tok.decode(ids, skip_special_tokens=False)
        if decoded != text:
            roundtrip_fail.append(name)
        cases.append({"name": name, "text": text, "ids": ids, "decoded": decoded})

    by_name = {c["name"]: c for c in cases}
    assert by_name["hello_world"]["ids"] == [15496, 11, 995, 0], by_name["hello_world"]["ids"]
    assert by_name["hello_period"]["ids"] == [15496, 13], by_name["hello_period"]["ids"]
    assert by_name["empty"]["ids"] == []
    assert len(cases) >= 220, len(cases)
    print("'Hello, world!' ->", by_name["hello_world"]["ids"])
    print("'Hello.' ->", by_name["hello_period"]["ids"])
    print("'<|endoftext|>' ->", by_name["eot_alone"]["ids"])
    print("'Hello<|endoftext|>World' ->", by_name["eot_in_text"]["ids"])

    out = {
        "generator": "scripts/gen_tokenizer_corpus.py",
        "tokenizers_version": tokenizers.__version__,
        "tokenizer": "models/default/tokenizer.json",
        "encode": "encode(text, add_special_tokens=False).ids",
        "decode": "decode(ids, skip_special_tokens=False)",
        "cases": cases,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="ascii") as f:
        json.dump(out, f, ensure_ascii=True, indent=None, separators=(",", ":"))
        f.write("\n")
    ntok = sum(len(c["ids"]) for c in cases)
    print(f"wrote {os.path.relpath(OUT, ROOT)}: {len(cases)} cases, {ntok} tokens, "
          f"{os.path.getsize(OUT)} bytes")
    print(f"cases where decode(encode(text)) != text: {len(roundtrip_fail)} {roundtrip_fail}")


if __name__ == "__main__":
    sys.exit(main())
