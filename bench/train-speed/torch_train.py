"""Replays minnow's training steps in PyTorch + transformers (+ PEFT for LoRA).

`minnow distill train --trace FILE` writes, per optimizer step, the learning
rate it used and the rows it trained on (token ids, prompt length). This
script loads the same GGUF with transformers (dequantized to f32, as minnow
does), builds the very same batches (one example a row, right-padded,
loss on the answer tokens, summed and divided by the step's answer
tokens, as minnow's loss), and trains with AdamW (weight decay on matrices
only, as minnow), the global gradient norm clipped, at each step's
learning rate from the trace. It writes each step's loss, gradient norm,
seconds and tokens, and the process's peak RSS, as JSON.

    python torch_train.py --gguf MODEL.gguf --trace trace.jsonl --out torch.json \
        [--mode full|lora] [--steps N] [--threads 2]

Used by `bench/train-speed/run.sh` (speed, side by side with minnow) and
`record_losses.py` (the losses the suite's test compares minnow's with).
"""

import argparse
import json
import os
import resource
import sys
import time


def load_trace(path, steps):
    lines = [json.loads(line) for line in open(path)]
    lines.sort(key=lambda s: s["step"])
    return lines[:steps] if steps else lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=["full", "lora"], default="full")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--clip", type=float, default=1.0)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    gguf = os.path.abspath(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32
    )
    if args.mode == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_dropout=0.0,
            bias="none",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )
        model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1.0,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    ce = torch.nn.CrossEntropyLoss(reduction="sum")
    steps = load_trace(args.trace, args.steps)
    out = {"mode": args.mode, "threads": args.threads, "torch": torch.__version__, "steps": []}
    for s in steps:
        for g in opt.param_groups:
            g["lr"] = s["lr"]
        rows_all = [row for mb in s["micro_batches"] for row in mb]
        if any(len(row) != 1 for row in rows_all):
            sys.exit("torch_train.py: a row holds several packed examples; replay needs one example a row")
        n_answer = sum(len(r[0]["tokens"]) - r[0]["n_prompt"] for r in rows_all)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        tokens = 0
        for mb in s["micro_batches"]:
            exs = [row[0] for row in mb]
            t = max(len(e["tokens"]) for e in exs)
            ids = torch.zeros((len(exs), t), dtype=torch.long)
            mask = torch.zeros((len(exs), t), dtype=torch.long)
            labels = torch.full((len(exs), t), -100, dtype=torch.long)
            for i, e in enumerate(exs):
                n = len(e["tokens"])
                ids[i, :n] = torch.tensor(e["tokens"])
                mask[i, :n] = 1
                labels[i, e["n_prompt"] : n] = torch.tensor(e["tokens"][e["n_prompt"] :])
                tokens += n
            logits = model(input_ids=ids, attention_mask=mask).logits
            # Position j-1 predicts token j.
            loss = ce(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)) / n_answer
            loss.backward()
            total += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(params, args.clip if args.clip > 0 else float("inf"))
        opt.step()
        seconds = time.perf_counter() - t0
        out["steps"].append(
            {"step": s["step"], "loss": total, "grad_norm": float(norm), "seconds": seconds, "tokens": tokens}
        )
        print(f"step {s['step']}: loss {total:.4f} norm {float(norm):.3f} {tokens / seconds:.0f} tok/s", file=sys.stderr)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
