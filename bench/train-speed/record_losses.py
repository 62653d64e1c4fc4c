"""Records PyTorch's losses for the suite's loss-curve test.

Runs `minnow distill train --trace` for the first 8 optimizer steps of the
reference experiment's full fine-tuning (SmolLM2-135M, the committed teacher
labels), replays exactly those steps in PyTorch + transformers
(torch_train.py), and writes pytorch-losses.json: the minnow arguments, and
per step the learning rate, PyTorch's loss and gradient norm, and a digest
of the rows trained on. `crates/minnow/tests/train_vs_pytorch.rs` trains with
the same arguments and checks that its rows have the same digests and its
losses are within 1% of PyTorch's. CI does not install PyTorch; run this
where it is installed (bench/train-speed/run.sh makes the venv):

    ~/.cache/minnow/train-speed-venv/bin/python bench/train-speed/record_losses.py
"""

import hashlib
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# Relative to the repository root; the test passes the same ones.
ARGS = [
    "distill", "train", "smollm2-135m",
    "--data", "examples/order-extraction/labeled/dataset.jsonl",
    "--lr", "2e-4", "--batch-tokens", "1024", "--max-seq", "384", "--warmup", "10",
    "--val-frac", "0", "--max-steps", "8", "--threads", "2", "--out-type", "q8_0",
]


def rows_digest(step):
    """sha256 of the step's rows: ids comma-joined, then `;` and the prompt
    length, examples joined by `+`, rows by `|`, micro-batches by `#`."""
    text = "#".join(
        "|".join("+".join(",".join(map(str, e["tokens"])) + ";" + str(e["n_prompt"]) for e in row) for row in mb)
        for mb in step["micro_batches"]
    )
    return hashlib.sha256(text.encode()).hexdigest()


def main():
    minnow = os.path.join(ROOT, "target/release/minnow")
    subprocess.run(["cargo", "build", "--release", "--locked", "-q", "-p", "minnow"], cwd=ROOT, check=True)
    gguf = subprocess.run([minnow, "pull", "smollm2-135m"], capture_output=True, text=True, check=True).stdout.split()[-1]
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.jsonl")
        subprocess.run([minnow, *ARGS, "-o", os.path.join(tmp, "out.gguf"), "--trace", trace], cwd=ROOT, check=True)
        result = os.path.join(tmp, "torch.json")
        subprocess.run(
            [sys.executable, os.path.join(HERE, "torch_train.py"), "--gguf", gguf, "--trace", trace, "--out", result, "--threads", "2"],
            check=True,
        )
        ours = [json.loads(line) for line in open(trace)]
        theirs = json.load(open(result))
    import torch, transformers

    record = {
        "what": "PyTorch's losses on minnow's first 8 full fine-tuning steps; written by record_losses.py",
        "pytorch": torch.__version__,
        "transformers": transformers.__version__,
        "minnow_args": ARGS,
        "steps": [
            {
                "step": o["step"],
                "lr": o["lr"],
                "rows_sha256": rows_digest(o),
                "loss": t["loss"],
                "grad_norm": t["grad_norm"],
                "minnow_loss_when_recorded": o["loss"],
            }
            for o, t in zip(ours, theirs["steps"])
        ],
    }
    path = os.path.join(HERE, "pytorch-losses.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    for s in record["steps"]:
        print(f"step {s['step']}: PyTorch {s['loss']:.6f}, minnow {s['minnow_loss_when_recorded']:.6f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
