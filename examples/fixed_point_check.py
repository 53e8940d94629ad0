"""SPIN's fixed point, checked: trained on the opponent's own samples as "real" data, it should barely move.

Run: nice .venv/bin/python examples/fixed_point_check.py [--out runs/fixed-point] [key=value ...]
(key=value: spin-lite settings for both runs, applied after examples/configs/demo.yaml's)

When the real responses are samples of the opponent p_0 itself, real and generated responses come from one
distribution and SPIN's optimum is p_0 (the expected gradient at p = p_0 is zero). This script trains one
iteration twice from the embedded model (SmolLM2-135M-Instruct) with the demo's settings:
  self:  "real" responses sampled from p_0 (spin_lite's decoder, temperature 1, top-p 1) for the prompts;
  real:  the demo data's human responses to the same prompts;
and measures how far each moved the model on held-out prompts: KL(p_0 || p_1) per response token (over the
whole vocabulary, at the positions of fresh samples of p_0) and the mean absolute change of those samples'
per-token log-probs. The self run moves only by sampling noise, so its drift should be a small fraction of
the real run's; a ratio near 1 means the loss, the masks or the sampling do not match what the opponent
generates (e.g. sharpened sampling, or real responses tokenized unlike generated ones).
The prompts are the demo's user turns cut to 6 tokens, so all render to one length and data.max_length cuts a
real response exactly where the opponent's generation is cut (48 tokens): a sample cut at the cap is data too.
Samples whose text does not re-encode to the sampled ids are left out. tests/test_fixed_point.py runs the
same functions on a tiny model, where the ratio is measured over seeds.

Output: not recorded yet. Three runs on 2 shared CPU cores (48, 32 and 24 rows) were each ended from outside
(SIGTERM/SIGKILL) during the second training run, after 15-35 minutes; the self run's training log showed the
anchored loss moving little (margin -0.02 after its 4 steps, 32 rows). Run it on an idle machine and paste
the printed JSON here.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "examples" / "data" / "demo_sft.jsonl"


def chat_rows(path: Path) -> list[list[dict]]:
    """The demo file's chats (messages lists), in file order."""
    return [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def sample(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, seed: int,
           batch_size: int = 16) -> list[tuple[list[int], list[int], bool]]:
    """(prompt ids, response ids, ended) per prompt: one sample of `model` at temperature 1, top-p 1 (the
    opponent's distribution itself), drawn by spin_lite's own decoder. A response ends with its end-of-turn
    token, or is cut at the cap."""
    from spin_lite.config import GenerationSettings
    from spin_lite.data import encode_prompt
    from spin_lite.generate import generate_batch, stop_token_ids
    settings = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_p=1.0)
    stops, out = stop_token_ids(tokenizer, model), []
    for i in range(0, len(prompts), batch_size):
        ids = [encode_prompt(tokenizer, p) for p in prompts[i:i + batch_size]]
        for x, (y, cut) in zip(ids, generate_batch(model, ids, settings, stops, tokenizer.pad_token_id, seed + i)):
            out.append((x, y, not cut))
    return out


def self_play_rows(model, tokenizer, chats: list[list[dict]], max_new_tokens: int, seed: int,
                   keep_cut: bool = False) -> list[dict]:
    """The chats with their last turn replaced by a sample of `model`, for the samples that can be data.

    A sample is kept when it is not empty and its text re-encodes to exactly the sampled ids
    (spin_lite.data.encode_conversation), so that training sees the opponent's own sequences. A sample cut at
    the cap is kept only with `keep_cut`: right when the run cuts real responses at the same length as the
    opponent's (every prompt the same length, data.max_length = prompt + cap); otherwise a real response
    would end where the opponent's does not. Each row keeps its chat's index ("row")."""
    from spin_lite.data import encode_conversation
    rows = []
    samples = sample(model, tokenizer, [c[:-1] for c in chats], max_new_tokens, seed)
    for k, (chat, (_, response, ended)) in enumerate(zip(chats, samples)):
        text = tokenizer.decode(response[:-1] if ended else response, skip_special_tokens=False)
        if not text.strip() or not (ended or keep_cut):
            continue
        try:
            ids = encode_conversation(tokenizer, chat[:-1], text)[1]
        except ValueError:
            continue
        if (ids if ended else ids[:len(response)]) == response:
            rows.append({"row": k, "messages": chat[:-1] + [{"role": "assistant", "content": text}]})
    return rows


def equal_length_chats(tokenizer, chats: list[list[dict]], content_tokens: int) -> list[list[dict]]:
    """One-turn chats whose prompts all render to the same number of tokens: each user turn cut to its first
    `content_tokens` tokens (chats with a shorter one, or whose cut text does not render to the common length,
    are left out). Then data.max_length = prompt + cap cuts real responses where generation is cut."""
    from spin_lite.data import encode_prompt
    out, length = [], None
    for chat in chats:
        ids = tokenizer(chat[0]["content"], add_special_tokens=False)["input_ids"]
        if len(chat) != 2 or len(ids) < content_tokens:
            continue
        cut = [{"role": "user", "content": tokenizer.decode(ids[:content_tokens])}, chat[1]]
        length = length or len(encode_prompt(tokenizer, cut[:1]))
        if len(encode_prompt(tokenizer, cut[:1])) == length:
            out.append(cut)
    return out


@torch.no_grad()
def drift(start, trained, sequences: list[tuple[list[int], list[int]]]) -> dict:
    """How far `trained` moved from `start` on the response tokens of `sequences` (prompt ids, response ids):
    kl: mean KL(start || trained) over the whole vocabulary per response position (nats/token);
    abs_logp: mean |log trained(y_t) - log start(y_t)| of the response tokens themselves (nats/token)."""
    kl, abs_logp, n = 0.0, 0.0, 0
    for prompt, response in sequences:
        ids = torch.tensor([prompt + response])
        cut = slice(len(prompt) - 1, ids.shape[1] - 1)  # the positions that predict the response tokens
        p = torch.log_softmax(start(ids).logits[0, cut].double(), -1)
        q = torch.log_softmax(trained(ids).logits[0, cut].double(), -1)
        kl += (p.exp() * (p - q)).sum().item()
        target = torch.tensor(response).unsqueeze(1)
        abs_logp += (q.gather(1, target) - p.gather(1, target)).abs().sum().item()
        n += len(response)
    return {"kl": kl / n, "abs_logp": abs_logp / n, "tokens": n}


def train_one_iteration(rows: list[dict], run_dir: Path, settings: list[str], config: Path | None = None):
    """One SPIN iteration on `rows` (written to run_dir/data.jsonl) with `config` (a YAML file, or the defaults)
    and `settings`, sampling the opponent at temperature 1, top-p 1; the trained model (base + adapter)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from spin_lite.config import load_config
    from spin_lite.model import model_path
    from spin_lite.run import SpinRun
    run_dir.mkdir(parents=True, exist_ok=True)
    data = run_dir / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = load_config(config, [f"run_dir={run_dir / 'run'}", f"data.path={data}", "iterations=1",
                             "eval.enabled=false", "generation.temperature=1.0", "generation.top_p=1.0",
                             *settings])
    SpinRun(cfg, log=lambda *a: None).run()
    base = AutoModelForCausalLM.from_pretrained(model_path(cfg.model), dtype=torch.float32)
    return PeftModel.from_pretrained(base, run_dir / "run" / "iter-00" / "adapter").eval()


def fixed_point_check(model_dir: Path, chats: list[list[dict]], held_out: list[list[dict]], out: Path,
                      settings: list[str], max_new_tokens: int, seed: int = 0, config: Path | None = None,
                      keep_cut: bool = False) -> dict:
    """Train on self-generated and on real responses to the same prompts; the drift of each on `held_out`.

    The first `data.eval_size + data.val_size` rows' worth of each file is held out by the run itself (drawn
    with the seed, the same rows in both runs); `held_out` are other prompts, for the drift only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    start = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    self_rows = self_play_rows(start, tokenizer, chats, max_new_tokens, seed, keep_cut)
    real_rows = [{"row": r["row"], "messages": chats[r["row"]]} for r in self_rows]  # the same prompts
    probes = [(x, y) for x, y, _ in sample(start, tokenizer, held_out, max_new_tokens, seed + 1)]
    report = {"rows": len(self_rows), "samples_left_out": len(chats) - len(self_rows)}
    for name, rows in (("self", self_rows), ("real", real_rows)):
        trained = train_one_iteration(rows, out / name, [f"model.name={model_dir}", f"seed={seed}", *settings],
                                      config)
        report[name] = drift(start, trained, probes)
    report["kl_ratio"] = report["self"]["kl"] / report["real"]["kl"]
    report["abs_logp_ratio"] = report["self"]["abs_logp"] / report["real"]["abs_logp"]
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/fixed-point", help="where the two runs go (replaced)")
    parser.add_argument("--rows", type=int, default=48, help="training prompts (one-turn chats of the demo data)")
    parser.add_argument("--held-out", type=int, default=16, help="held-out prompts the drift is measured on")
    parser.add_argument("--prompt-tokens", type=int, default=6, help="user turns cut to this many tokens")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="the cap of every response")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("settings", nargs="*", help="spin-lite key=value settings for both runs (after the demo's)")
    args = parser.parse_args(argv)
    import shutil

    from transformers import AutoTokenizer

    from spin_lite.config import ModelConfig
    from spin_lite.data import encode_prompt
    from spin_lite.model import model_path
    out, model_dir = Path(args.out), Path(model_path(ModelConfig(name="embedded")))
    shutil.rmtree(out, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chats = equal_length_chats(tokenizer, chat_rows(DEMO_DATA), args.prompt_tokens)
    prompt = len(encode_prompt(tokenizer, chats[0][:1]))
    # the demo's settings (examples/configs/demo.yaml: lr 5e-4, 1 epoch, 4 x 2 pairs per step), 4 + 4 rows held
    # out by the run, every other row trained on, real responses cut where generation is
    settings = ["data.eval_size=4", "data.val_size=4", f"data.max_examples={args.rows}",
                f"data.max_prompt_length={prompt}", f"data.max_length={prompt + args.max_new_tokens}",
                f"generation.max_new_tokens={args.max_new_tokens}", "train.stop_when=never", *args.settings]
    report = fixed_point_check(model_dir, chats[: args.rows + 8], [c[:-1] for c in chats[-args.held_out:]], out,
                               settings, args.max_new_tokens, args.seed, REPO / "examples" / "configs" / "demo.yaml",
                               keep_cut=True)
    print(json.dumps(report, indent=1))
    print(f"KL(p0 || p1) per token: self-generated data {report['self']['kl']:.4f}, real data "
          f"{report['real']['kl']:.4f}, ratio {report['kl_ratio']:.3f}")
    return report


if __name__ == "__main__":
    main()
