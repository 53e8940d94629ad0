"""Write examples/data/arithmetic_sft.jsonl: short arithmetic questions with answers checkable by string match.

    python examples/make_arithmetic_data.py            # 240 rows, seed 0 (the file in the repository)

The second data set of docs/RESULTS.md, of a different kind than the demo's house style: each response states
the sum or difference in one fixed short form ("37 + 48 = 85."), so a greedy answer is right when the number
after "=" is (eval.answer_regex "= *(-?[0-9]+)"). Questions are phrased a few ways so the prompt is not a template.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PHRASES = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?",
           "Please calculate {a} {op} {b}.", "{a} {op} {b} = ?"]


def rows(n: int, seed: int) -> list[dict]:
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        a, b, op = rng.randint(2, 99), rng.randint(2, 99), rng.choice("+-")
        if (a, b, op) in seen:
            continue
        seen.add((a, b, op))
        answer = a + b if op == "+" else a - b
        question = rng.choice(PHRASES).format(a=a, b=b, op=op)
        out.append({"messages": [{"role": "user", "content": question},
                                 {"role": "assistant", "content": f"{a} {op} {b} = {answer}."}]})
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "data" / "arithmetic_sft.jsonl"))
    args = parser.parse_args(argv)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows(args.rows, args.seed)))
    print(f"wrote {args.rows} rows to {args.out}")


if __name__ == "__main__":
    main()
