"""Train the course's tiny target and draft models on the King James Bible (course_lib/model/corpus.py).

    python tools/train_tiny.py tokenizer                 # byte-level BPE, 2,048 tokens -> checkpoints/tokenizer.json
    python tools/train_tiny.py target      # on an H200: about 2 minutes
    python tools/train_tiny.py draft       # under a minute

Each model is saved (bf16 safetensors + config.json + tokenizer.json) with a train_log.json of its
losses, in the Hugging Face layout that course_lib.load_pretrained reads. The checkpoint kept is the one
with the lowest validation loss (evaluated every --eval-every steps): the corpus is small, so later steps
would only memorize it.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

import course_lib  # first: resolves the device before anything imports triton
from course_lib import ModelConfig, corpus
from course_lib.model.checkpoint import CHECKPOINTS, save_pretrained
from course_lib.model.llama import Llama
from course_lib.model.tokenizer import EOS, Tokenizer

CONFIGS = {
    "target": ModelConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512),
    "draft": ModelConfig(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
}
# Training settings of the shipped checkpoints (the target's were picked by a sweep over dropout 0.2/0.3 and
# lr 1e-3/2e-3 on the validation loss; see its MODEL_CARD.md).
TRAINING = {
    "target": dict(steps=3000, lr=2e-3, dropout=0.3),
    "draft": dict(steps=4000, lr=2e-3, dropout=0.1),
}
TOKENIZER = CHECKPOINTS / "tokenizer.json"


def train_tokenizer(vocab_size: int = 2048) -> None:
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus.chapters(), trainer=trainer)
    TOKENIZER.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(TOKENIZER))
    print(f"tokenizer: {tok.get_vocab_size()} tokens -> {TOKENIZER}")


def token_stream(tokenizer: Tokenizer, split: str) -> torch.Tensor:
    ids = []
    for i, chapter in enumerate(corpus.chapters()):
        if (split == "validation") == (i % corpus.VALIDATION_EVERY == 12):
            ids += tokenizer.encode(chapter) + [tokenizer.eos_id]
    return torch.tensor(ids, dtype=torch.long)


def add_residual_dropout(model: Llama, p: float) -> None:
    """Dropout on each attention and MLP output while training (a hook, so the inference model has none)."""
    def hook(module, args, output):
        return F.dropout(output, p, module.training)
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


@torch.no_grad()
def evaluate(model: Llama, data: torch.Tensor, seq_len: int, device) -> float:
    model.eval()
    n = (len(data) - 1) // seq_len
    x = data[: n * seq_len].view(n, seq_len)
    y = data[1: n * seq_len + 1].view(n, seq_len)
    total = 0.0
    for i in range(0, n, 64):
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x[i:i + 64].to(device))
        total += F.cross_entropy(logits.float().flatten(0, 1), y[i:i + 64].to(device).flatten(), reduction="sum").item()
    model.train()
    return total / (n * seq_len)


def train(name: str, steps: int, batch_size: int, seq_len: int, lr: float, eval_every: int, dropout: float,
          seed: int, out: Path) -> None:
    device = course_lib.DEVICE
    torch.manual_seed(seed)
    tokenizer = Tokenizer(TOKENIZER)
    train_ids, val_ids = token_stream(tokenizer, "train"), token_stream(tokenizer, "validation")
    config = CONFIGS[name]
    config.eos_token_id = tokenizer.eos_id
    model = Llama(config).to(device)
    for p_name, p in model.named_parameters():  # GPT-2 style init: small normal weights, ones for norms
        if p.dim() == 2:
            residual = p_name.endswith(("o_proj.weight", "down_proj.weight"))
            torch.nn.init.normal_(p, std=0.02 / (math.sqrt(2 * config.num_hidden_layers) if residual else 1))
    add_residual_dropout(model, dropout)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    log = {"model": name, "parameters": config.num_parameters(), "train_tokens": len(train_ids),
           "validation_tokens": len(val_ids), "batch_size": batch_size, "seq_len": seq_len, "lr": lr,
           "dropout": dropout, "seed": seed, "steps": steps, "device": torch.cuda.get_device_name(0)
           if device.type == "cuda" else platform.processor() or "cpu", "torch": torch.__version__,
           "date": date.today().isoformat(), "train_loss": [], "validation_loss": []}
    best = float("inf")
    t0 = time.time()
    g = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(train_ids) - seq_len - 1, (batch_size,), generator=g)
        x = torch.stack([train_ids[s: s + seq_len] for s in starts]).to(device)
        y = torch.stack([train_ids[s + 1: s + seq_len + 1] for s in starts]).to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            log["train_loss"].append([step, round(loss.item(), 4)])
        if step % eval_every == 0 or step == steps:
            val = evaluate(model, val_ids, seq_len, device)
            log["validation_loss"].append([step, round(val, 4)])
            print(f"{name} step {step}: train {loss.item():.3f}  validation {val:.3f}  ({time.time() - t0:.0f} s)",
                  flush=True)
            if val < best:
                best = val
                log.update(best_step=step, best_validation_loss=round(val, 4),
                           best_validation_perplexity=round(math.exp(val), 2))
                save_pretrained(model, out, dtype=torch.bfloat16)
    log["train_seconds"] = round(time.time() - t0, 1)
    shutil.copy(TOKENIZER, out / "tokenizer.json")
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"{name}: best validation loss {best:.3f} (perplexity {math.exp(best):.1f}) at step {log['best_step']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["tokenizer", "target", "draft"])
    ap.add_argument("--steps", type=int, default=None, help="default: TRAINING[model]")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=None, help="default: TRAINING[model]")
    ap.add_argument("--dropout", type=float, default=None, help="default: TRAINING[model]")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="folder to save into (default: checkpoints/tiny-NAME)")
    a = ap.parse_args()
    if a.what == "tokenizer":
        train_tokenizer()
    else:
        for key, value in TRAINING[a.what].items():
            if getattr(a, key) is None:
                setattr(a, key, value)
        train(a.what, a.steps, a.batch_size, a.seq_len, a.lr, a.eval_every, a.dropout, a.seed,
              a.out or CHECKPOINTS / f"tiny-{a.what}")


if __name__ == "__main__":
    main()
