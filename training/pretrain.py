"""Stage 0b, continued pretraining on a cleaned corpus (training/corpus.py), with TRL's SFTTrainer
on packed plain text (no chat template: the model reads the documents as documents).

    python -m training.pretrain --model data/models/smollm2-135m-instruct \
        --corpus data/corpora/handbook/corpus.jsonl --out data/runs/pretrain-1
    python -m training.pretrain ... --register --url sqlite:///data/chat.db   # a servable version

Documents are split (by document, seeded) into training and held-out parts; perplexity on the
held-out part is measured before and after, and so is chat perplexity on held-out dialogues
(the replies of the shipped HH-RLHF sample under the serving chat template), so a version that
learned the handbook but forgot how to chat shows it. Registered versions carry both.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from training.common import base_trainer_args, freeze_lower_layers, read_jsonl, save_model_dir


@dataclass
class PretrainConfig:
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training documents."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Learning rate (top train_layers blocks only)."})
    block_tokens: int = field(default=256, metadata={"help": "Tokens per packed training sequence."})
    batch_size: int = field(default=4, metadata={"help": "Sequences per step."})
    train_layers: int = field(default=10, metadata={"help": "Train only the top N transformer blocks (0 = all)."})
    heldout_fraction: float = field(default=0.1, metadata={"help": "Share of documents held out for perplexity."})
    chat_dialogues: int = field(default=12, metadata={"help": "Held-out HH dialogues whose replies measure chat "
                                                              "perplexity (forgetting)."})
    max_minutes: float = field(default=0.0, metadata={"help": "Stop training after this many minutes even "
                                                              "mid-epoch (0 = no limit; perplexity runs after)."})
    seed: int = field(default=0, metadata={"help": "Seed for the split and training."})

    def validate(self) -> "PretrainConfig":
        if not 0 < self.heldout_fraction < 0.5:
            raise ValueError("heldout_fraction must be in (0, 0.5)")
        if self.block_tokens < 16 or self.batch_size < 1 or self.epochs <= 0 or self.max_minutes < 0:
            raise ValueError("block_tokens must be >= 16, batch_size >= 1, epochs > 0 and max_minutes >= 0")
        return self


def split_documents(docs: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) by whole document, at least one of each."""
    if len(docs) < 2:
        raise ValueError(f"continued pretraining needs at least 2 documents (a held-out one); got {len(docs)}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_held = min(len(docs) - 1, max(1, round(fraction * len(docs))))
    held = set(order[:n_held])
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def text_perplexity(model, tokenizer, docs: list[str], block_tokens: int) -> float:
    """Perplexity of documents read as plain text, each cut into blocks of ``block_tokens``."""
    import torch

    nll, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for doc in docs:
            ids = tokenizer(doc, add_special_tokens=False).input_ids
            for start in range(0, len(ids), block_tokens):
                block = torch.tensor([ids[start:start + block_tokens]])
                if block.shape[1] < 2:
                    continue
                out = model(input_ids=block, labels=block)
                nll += float(out.loss) * (block.shape[1] - 1)
                count += block.shape[1] - 1
    return math.exp(nll / count) if count else float("nan")


def chat_dialogues(n: int) -> list[list[dict]]:
    """Held-out chat: the shipped HH-RLHF dialogues as messages, each ending in a reply."""
    from feedback.importer import parse_hh
    from model.perplexity import heldout_texts

    dialogues = [parse_hh(t) for t in heldout_texts(min(n, 12))]
    return [d for d in dialogues if d and d[-1]["role"] == "assistant"]


def time_budget_callback(minutes: float):
    """A TrainerCallback that ends training once ``minutes`` of it have passed (checked per step),
    so an admin can say "pretrain for 15 minutes" on a corpus bigger than 15 minutes' worth."""
    import time

    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.deadline = time.monotonic() + minutes * 60

        def on_step_end(self, args, state, control, **kwargs):
            if time.monotonic() >= self.deadline:
                control.should_training_stop = True
            return control

    return TimeBudget()


def run_pretrain(model_path, corpus_path, out_dir, cfg: PretrainConfig, callbacks=()) -> tuple[Path, dict]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from training.evaluate import perplexity as chat_perplexity

    cfg.validate()
    docs = [r["text"] for r in read_jsonl(corpus_path) if str(r.get("text", "")).strip()]
    train, held = split_documents(docs, cfg.heldout_fraction, cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(model_path))
    chats = chat_dialogues(cfg.chat_dialogues)
    before = {"heldout_ppl": text_perplexity(model, tokenizer, held, cfg.block_tokens),
              "chat_ppl": chat_perplexity(model, tokenizer, chats)}
    freeze_lower_layers(model, cfg.train_layers)
    args = SFTConfig(num_train_epochs=cfg.epochs, learning_rate=cfg.learning_rate,
                     per_device_train_batch_size=cfg.batch_size, max_length=cfg.block_tokens, packing=True,
                     dataset_text_field="text", completion_only_loss=False,
                     **base_trainer_args(Path(out_dir) / "trainer", cfg.seed))
    # eos between documents, so packed neighbours are not read as one text
    rows = [{"text": d + tokenizer.eos_token} for d in train]
    budget = [time_budget_callback(cfg.max_minutes)] if cfg.max_minutes else []
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=list(callbacks) + budget)
    started = time.monotonic()
    result = trainer.train()
    train_s = time.monotonic() - started
    trained = trainer.model
    after = {"heldout_ppl": text_perplexity(trained, tokenizer, held, cfg.block_tokens),
             "chat_ppl": chat_perplexity(trained, tokenizer, chats)}
    path = save_model_dir(trained, tokenizer, Path(out_dir) / "model")
    metrics = {"documents_train": len(train), "documents_heldout": len(held),
               "train_tokens": sum(len(tokenizer(d, add_special_tokens=False).input_ids) for d in train),
               "heldout_ppl_before": before["heldout_ppl"], "heldout_ppl_after": after["heldout_ppl"],
               "chat_ppl_before": before["chat_ppl"], "chat_ppl_after": after["chat_ppl"],
               "train_loss": float(result.training_loss), "train_s": train_s,
               "steps": trainer.state.global_step, "steps_planned": trainer.state.max_steps, "config": asdict(cfg)}
    return path, metrics


def register(url: str, path: Path, metrics: dict, name: str) -> str:
    """Record the model as a version (stage ``pretrain``) whose parent is the active one."""
    import os

    from feedback import training_repo
    from feedback.db import make_engine, make_session_factory, session_scope

    factory = make_session_factory(make_engine(url))
    with session_scope(factory) as s:
        parent = training_repo.active_version(session=s)
        final = Path(os.environ.get("CHAT_DATA_DIR", "data")).resolve() / "versions" / name
        if final.exists():
            raise FileExistsError(f"{final} exists already: choose another --name")
        final.parent.mkdir(parents=True, exist_ok=True)
        training_repo.add_version(session=s, name=name, path=str(final), parent_id=parent.id if parent else None,
                          stage="pretrain", metrics=metrics, config=metrics["config"], snapshot_id=None,
                          training_run_id=None)  # a taken name fails here, before anything moves
        os.replace(path, final)  # atomic; if it fails the row above is rolled back
    return str(final)


def main() -> None:
    from training.progress import Reporter, ReporterCallback

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--corpus", required=True, help="corpus.jsonl from python -m training.corpus")
    parser.add_argument("--out", required=True)
    parser.add_argument("--register", action="store_true", help="register the result as a version")
    parser.add_argument("--url", default=None, help="database URL for --register (default: the configured one)")
    parser.add_argument("--name", default=None, help="version name for --register (default: the out dir's name)")
    for f in fields(PretrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                            help=f.metadata["help"])
    args = parser.parse_args()
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    try:
        path, metrics = run_pretrain(args.model, args.corpus, args.out, cfg,
                                     callbacks=[ReporterCallback(Reporter(), "pretrain")])  # a terminal bar
    except ValueError as exc:
        parser.exit(1, f"error: {exc}\n")
    print(f"held-out perplexity {metrics['heldout_ppl_before']:.2f} -> {metrics['heldout_ppl_after']:.2f}; "
          f"chat perplexity {metrics['chat_ppl_before']:.2f} -> {metrics['chat_ppl_after']:.2f}; saved to {path}")
    if args.register:
        from feedback.db import default_url

        print("registered at", register(args.url or default_url(), path, metrics, args.name or Path(args.out).name))


if __name__ == "__main__":
    main()
