"""Fine-tune a BERT-family model on SST-2 with transformers.Trainer, its gradients compressed by
lowbit. An ordinary Trainer script; the two lowbit lines are marked. Run it under torchrun:

    torchrun --nproc-per-node 2 examples/hf_trainer.py --model minilm-l1 --max-steps 60
    torchrun --nproc-per-node 2 examples/hf_trainer.py --bits 0      # the same run without lowbit

Rank 0 writes ``--out`` (JSON): the losses logged, lowbit's byte counter and the elements of every
gradient bucket the hook saw (``tests/integrations/test_hf.py`` checks them).
"""
import argparse
import json

import torch
from transformers import Trainer, TrainingArguments

from lowbit.integrations.hf import LowbitCallback  # lowbit (1 of 2)
from lowbit.models.presets import load_preset
from lowbit.train.data import encode, load_glue_tsv, subset


class Examples(torch.utils.data.Dataset):
    def __init__(self, enc: dict):
        self.enc = enc

    def __len__(self):
        return len(self.enc["labels"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.enc.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-bert", help="a lowbit preset (tiny-bert, minilm, minilm-l1, ...)")
    ap.add_argument("--bits", type=int, default=3, help="gradient bits, 2..8; 0 = plain DDP all-reduce")
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--train-subset", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16, help="per rank")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--output-dir", default="runs/hf_trainer")
    ap.add_argument("--out", default=None, help="JSON summary written by rank 0")
    args = ap.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_preset(args.model, num_labels=2)
    sents, labels = load_glue_tsv("SST-2", "train")
    idx = subset(args.train_subset, 0, len(sents))
    train = Examples(encode(tokenizer, [sents[i] for i in idx], [labels[i] for i in idx], args.max_len))

    targs = TrainingArguments(output_dir=args.output_dir, max_steps=args.max_steps, learning_rate=args.lr,
                              per_device_train_batch_size=args.batch, logging_steps=1, save_strategy="no",
                              report_to=[], use_cpu=not torch.cuda.is_available(), seed=0,
                              dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=train)
    callback = LowbitCallback(trainer, bits=args.bits) if args.bits else None
    if callback:
        trainer.add_callback(callback)  # lowbit (2 of 2)
    trainer.train()

    if trainer.is_world_process_zero() and args.out:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        st = callback.state if callback else None
        summary = {"model": args.model, "bits": args.bits, "world_size": trainer.args.world_size,
                   "steps": trainer.state.global_step, "losses": losses,
                   "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                   "bytes_sent": st.counter.up_sent if st else None,
                   "bytes_recv": st.counter.up_recv if st else None,
                   "iterations": st.iteration if st else None,
                   "bucket_numel": st.bucket_numel if st else None}
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
