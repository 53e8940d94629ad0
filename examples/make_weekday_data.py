"""Write examples/data/weekdays_sft.jsonl: free-text answers about calendar days, each with one checkable fact.

    python examples/make_weekday_data.py          # 196 rows, seed 0 (the file in the repository: 7 days x 28 offsets)

The fourth data set of docs/RESULTS.md (round 4): the question names a day of the week and a number of days; the
answer is a sentence of free text that reasons once and states the day ("Counting 10 days on from Tuesday: 10 days
is 1 week and 3 days, so it will be Friday."). A greedy answer is right when the day it names after "will be" is the
real response's (eval.answer_regex "will be ([A-Z][a-z]+day)"): the fact is checkable, the wording is free.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
PHRASES = ["If today is {day}, what day will it be in {n} days?", "Today is {day}. Which day is it {n} days from now?",
           "What day of the week comes {n} days after {day}?", "It is {day} now. What day will it be after {n} days?"]


def answer(day: str, n: int) -> str:
    weeks, rest = divmod(n, 7)
    target = DAYS[(DAYS.index(day) + n) % 7]
    if weeks == 0:
        working = f"{n} days after {day}"
    else:
        working = (f"{n} days is {weeks} week{'s' if weeks > 1 else ''}" +
                   (f" and {rest} day{'s' if rest > 1 else ''}" if rest else " exactly"))
    return f"Counting {n} days on from {day}: {working}, so it will be {target}."


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "data" / "weekdays_sft.jsonl"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows = []
    for day in DAYS:
        for n in range(2, 30):  # 28 offsets a day: every prompt is distinct
            prompt = rng.choice(PHRASES).format(day=day, n=n)
            rows.append({"messages": [{"role": "user", "content": prompt},
                                      {"role": "assistant", "content": answer(day, n)}]})
    rng.shuffle(rows)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
