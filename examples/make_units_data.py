"""Write examples/data/units_sft.jsonl: unit conversions answered in three sentences, the last with a checkable number.

    python examples/make_units_data.py            # 180 rows, seed 0 (the file in the repository; 10 units x 18 counts allows 180)

The third data set of docs/RESULTS.md (round 3), of another kind than the house style (a fixed frame) and the
arithmetic (one short line): each response is three sentences, a fact (the conversion factor), the working, and
the result ("An hour has 60 minutes. 7 hours is 7 x 60 minutes. So 7 hours = 420 minutes."). A greedy answer is
right when the number after its first "=" equals the real response's (eval.answer_regex "= *([0-9]+)"), so the
model must state the fact and multiply, not copy a format.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# (plural unit asked about, singular, factor, target unit): facts a small instruct model has seen
UNITS = [("hours", "hour", 60, "minutes"), ("minutes", "minute", 60, "seconds"), ("days", "day", 24, "hours"),
         ("weeks", "week", 7, "days"), ("meters", "meter", 100, "centimeters"), ("kilograms", "kilogram", 1000, "grams"),
         ("feet", "foot", 12, "inches"), ("dozens", "dozen", 12, "items"), ("years", "year", 12, "months"),
         ("liters", "liter", 1000, "milliliters")]
PHRASES = ["How many {to} are in {n} {unit}?", "Convert {n} {unit} to {to}.", "{n} {unit} is how many {to}?",
           "What is {n} {unit} in {to}?", "Please tell me how many {to} make {n} {unit}."]


def article(word: str) -> str:
    return "An" if word[0] in "aeiou" or word == "hour" else "A"


def rows(n: int, seed: int) -> list[dict]:
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        unit, one, factor, to = rng.choice(UNITS)
        k = rng.randint(2, 19)
        if (unit, k) in seen:
            continue
        seen.add((unit, k))
        question = rng.choice(PHRASES).format(n=k, unit=unit, to=to)
        answer = (f"{article(one)} {one} has {factor} {to}. {k} {unit} is {k} x {factor} {to}. "
                  f"So {k} {unit} = {k * factor} {to}.")
        out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=180)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "data" / "units_sft.jsonl"))
    args = parser.parse_args(argv)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows(args.rows, args.seed)))
    print(f"wrote {args.rows} rows to {args.out}")


if __name__ == "__main__":
    main()
