"""GLUE (SST-2) benchmark: full precision vs Q8BERT vs TernaryBERT (TWN, LAT) on MiniLM.

1. fine-tune all-MiniLM-L6-v2 (BertForSequenceClassification) on SST-2 in fp32 -> the teacher;
2. from the teacher's weights, distillation-aware quantized fine-tuning (lowbit.models.distill_step:
   soft CE on logits + MSE on hidden states + MSE on attention scores, plus hard-label CE) with
   Q8BERT (8-8-8 symmetric, EMA activations) and TernaryBERT 2-2-8 (TWN, and LAT with Adam's v);
3. dev accuracy (SST-2's metric) on the full GLUE dev set, packed-checkpoint size on disk
   (lowbit.models.export_packed), the drop vs fp32, next to the published drops.

CPU default (sized for ~10-15 min on 2 otherwise idle cores): 1,024 training
sentences (a fixed random subset), max_len 64 with per-batch dynamic padding, batch 32, 1 epoch
fp32 (32 steps) and 1 epoch (32 steps) of distillation per quantized model, full dev set (872).
A full GPU run would use the full training set (67,349), max_len 128, batch 32, 3 epochs fp32 and
3 epochs of distillation per quantized model (TernaryBERT's recipe: lr 5e-5, best dev checkpoint):
    python benchmarks/glue.py --train-subset 0 --max-len 128 --epochs 3 --q-epochs 3
The recorded GPU run (results/glue_h100.json, one H100; MiniLM weights carried as fp16 and
loaded as fp32, hence --preset <dir>):
    python benchmarks/glue.py --preset <minilm dir> --train-subset 32000 --max-len 64 --epochs 2 --q-epochs 1

    .venv/bin/python benchmarks/glue.py                 # CPU default
    .venv/bin/python benchmarks/glue.py --preset tiny-bert --train-subset 64 --eval-subset 64   # smoke
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch

from lowbit.benchmarks._common import RESULTS
from tqdm import tqdm


from lowbit.models import attach_optimizer, distill_step, export_packed, load_preset, wrap  # noqa: E402
from lowbit.train.data import encode, load_glue_tsv, subset  # noqa: E402

DEVICE = torch.device("cpu")

PUBLISHED = {
    "fp32": "BERT-base 93.1 (TernaryBERT Table 1)",
    "q8bert": "within 1% of fp32 (Q8BERT, Zafrir et al. 2019)",
    "ternarybert-twn": "-0.3 (TernaryBERT 2-2-8: 93.1 -> 92.8)",
    "ternarybert-lat": "-0.3 (TernaryBERT 2-2-8 row: 93.1 -> 92.8)",
}


def batches(data, bs, shuffle, seed):
    """Mini-batches trimmed to their longest sequence (dynamic padding: SST-2 training phrases are
    short). Without shuffling, examples are taken in order of length (for evaluation)."""
    n = data["labels"].shape[0]
    lengths = data["attention_mask"].sum(1)
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.argsort(lengths, stable=True)
    for i in range(0, n, bs):
        idx = order[i:i + bs]
        width = int(lengths[idx].max())
        yield {k: (v[idx, :width] if v.dim() == 2 else v[idx]).to(DEVICE) for k, v in data.items()}


def evaluate(model, dev, bs, desc):
    model.eval()
    correct = 0
    with torch.no_grad():
        for b in tqdm(list(batches(dev, bs, False, 0)), desc=f"eval {desc}", leave=False):
            labels = b.pop("labels")
            correct += int((model(**b).logits.argmax(-1) == labels).sum())
    return 100.0 * correct / dev["labels"].shape[0]


def linear_schedule(opt, total, warmup_frac=0.1):
    warm = max(1, int(total * warmup_frac))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))


def finetune_fp(model, train, args):
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    steps = args.epochs * math.ceil(train["labels"].shape[0] / args.batch_size)
    sch = linear_schedule(opt, steps)
    model.train()
    bar = tqdm(total=steps, desc="fp32 fine-tune")
    for ep in range(args.epochs):
        for b in batches(train, args.batch_size, True, args.seed + ep):
            loss = model(**b).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sch.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


def distill(teacher, scheme, opts, train, args, desc):
    student = wrap(copy.deepcopy(teacher), scheme, **opts)
    opt = torch.optim.AdamW(student.parameters(), lr=args.q_lr, weight_decay=0.01)
    if opts.get("method") == "lat":
        attach_optimizer(student, opt)
    steps = args.q_epochs * math.ceil(train["labels"].shape[0] / args.batch_size)
    sch = linear_schedule(opt, steps)
    weights = {"logits": 1.0, "hidden": 1.0, "attention": 1.0, "label": 1.0}
    bar = tqdm(total=steps, desc=desc)
    for ep in range(args.q_epochs):
        for b in batches(train, args.batch_size, True, args.seed + 100 + ep):
            r = distill_step(student, teacher, b, opt, weights, T=1.0, scheduler=sch)
            bar.update(1)
            bar.set_postfix(loss=f"{r['loss']:.3f}")
    bar.close()
    return student.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="SST-2")
    p.add_argument("--preset", default="minilm")
    p.add_argument("--train-subset", type=int, default=1024, help="0 = the full training set")
    p.add_argument("--eval-subset", type=int, default=0, help="0 = the full dev set")
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--q-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--q-lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(RESULTS / "glue.json"))
    p.add_argument("--ckpt-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "lowbit_glue_ckpt"),
                   help="where the fp32 and packed checkpoints are written (their sizes are reported)")
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()

    model, tok = load_preset(args.preset, num_labels=2)
    model.to(DEVICE)
    s, l = load_glue_tsv(args.task, "train")
    idx = subset(args.train_subset, args.seed, len(s))
    train = encode(tok, [s[i] for i in idx], [l[i] for i in idx], max_len=args.max_len)
    ds, dl = load_glue_tsv(args.task, "dev")
    if args.eval_subset:
        ds, dl = ds[:args.eval_subset], dl[:args.eval_subset]
    dev = encode(tok, ds, dl, max_len=args.max_len)
    outdir = Path(args.out).parent
    outdir.mkdir(parents=True, exist_ok=True)
    ckdir = Path(args.ckpt_dir)
    ckdir.mkdir(parents=True, exist_ok=True)

    rows = []
    out_path = Path(args.out)

    def dump(final=False):
        out_path.write_text(json.dumps({"setup": vars(args) | {"device": str(DEVICE), "complete": final},
                                        "results": rows}, indent=2))

    teacher = finetune_fp(model, train, args)
    fp_acc = evaluate(teacher, dev, 64, "fp32")
    from safetensors.torch import save_file
    fp_path = ckdir / "fp32.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()}, str(fp_path))
    rows.append(dict(method="fp32", bits="32-32-32", acc=fp_acc, size_mb=fp_path.stat().st_size / 1e6,
                     drop=0.0, published=PUBLISHED["fp32"], minutes=(time.time() - t0) / 60))
    dump()

    runs = [("q8bert", "q8bert", {}, "8-8-8"),
            ("ternarybert-twn", "ternarybert", {"method": "twn"}, "2-2-8"),
            ("ternarybert-lat", "ternarybert", {"method": "lat"}, "2-2-8")]
    for name, scheme, opts, bits in runs:
        t1 = time.time()
        student = distill(teacher, scheme, opts, train, args, name)
        acc = evaluate(student, dev, 64, name)
        size = export_packed(student, ckdir / f"{name}.safetensors")
        rows.append(dict(method=name, bits=bits, acc=acc, size_mb=size / 1e6, drop=acc - fp_acc,
                         published=PUBLISHED[name], minutes=(time.time() - t1) / 60))
        dump()
        del student

    n_train = train["labels"].shape[0]
    steps = math.ceil(n_train / args.batch_size)
    setup = dict(task=args.task, preset=args.preset, train_sentences=n_train, dev_sentences=len(dl),
                 max_len=args.max_len, batch_size=args.batch_size, fp_epochs=args.epochs, q_epochs=args.q_epochs,
                 fp_steps=args.epochs * steps, q_steps=args.q_epochs * steps, lr=args.lr, q_lr=args.q_lr,
                 seed=args.seed, threads=args.threads, device=str(DEVICE), total_minutes=(time.time() - t0) / 60,
                 distill_weights="logits 1, hidden 1, attention 1, label CE 1",
                 metric="accuracy (SST-2's GLUE metric)",
                 gpu_run="full train set (67,349), max_len 128, batch 32, 3 epochs fp32 + 3 epochs distillation; "
                         "an H100 run of 32k sentences, 2+1 epochs took 5.5 min (results/glue_h100.json)")
    hdr = f"{'method':<17}{'W-E-A':<10}{'dev acc %':>10}{'size MB':>10}{'drop':>8}   published (BERT-base)"
    print(f"\nGLUE {args.task}, {args.preset}: {n_train} train sentences, {len(dl)} dev, max_len {args.max_len}, "
          f"{setup['fp_steps']} fp32 steps + {setup['q_steps']} distillation steps each, "
          f"{setup['total_minutes']:.1f} min")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['method']:<17}{r['bits']:<10}{r['acc']:>10.2f}{r['size_mb']:>10.2f}{r['drop']:>+8.2f}   "
              f"{r['published']}")
    Path(args.out).write_text(json.dumps({"setup": setup, "results": rows}, indent=2))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
