"""`moe-train`: build the corpus, train the tokenizer, train a model, evaluate it and write its model card.

moe-train corpus                      # fetch the offline sources into data/corpus (train/validation/test)
moe-train tokenizer                   # byte-level BPE on the train split -> data/tokenizer
moe-train train OUT --method simbal   # train; rerun the same command to resume after a kill
moe-train eval OUT --split test --write-card
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from corpus.splits import DEFAULT_CORPUS_DIR, REPO_ROOT, SPLITS, CorpusError, read_split
from engine.command_line import HelpFormatter, command_parser
from engine.tokenizer import save_tokenizer_files
from training.bpe import train_tokenizer
from training.card import write_model_card
from training.corpus import DEFAULT_CACHE_DIR, build_corpus
from training.evaluate import evaluate_checkpoint
from training.trainer import TrainConfig, Trainer

DEFAULT_TOKENIZER_DIR = REPO_ROOT / "data" / "tokenizer"


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        kind = float if field.name == "balance_coef" else type(default)
        parser.add_argument(flag, type=kind, default=default, help=f"(default: {default})")


def _corpus(args: argparse.Namespace) -> None:
    if args.files and args.out is None:
        raise CorpusError(f"pass --out for a corpus of your own files ({DEFAULT_CORPUS_DIR} holds the bundled one)")
    manifest = build_corpus(args.out or DEFAULT_CORPUS_DIR, args.cache, args.files)
    print(json.dumps(manifest["splits"], indent=2))


def _tokenizer(args: argparse.Namespace) -> None:
    tokenizer = train_tokenizer(read_split("train", args.corpus), args.vocab)
    save_tokenizer_files(tokenizer, args.out)
    print(f"{args.out}: vocabulary {tokenizer.get_vocab_size()}")


def _train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    config = TrainConfig(**{name: getattr(args, name) for name in names})
    Trainer(config, args.output, args.tokenizer, args.corpus, args.device).run(keep_state=args.keep_state)
    print(args.output)


def _eval(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    result = evaluate_checkpoint(args.model, args.split, args.corpus)
    if args.write_card:
        (args.model / f"eval_{args.split}.json").write_text(json.dumps(result, indent=2) + "\n")
        if args.split == "test":  # the card reports the test split
            write_model_card(args.model, args.corpus)
    print(json.dumps(result, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = command_parser("moe-train", __doc__ or "")
    commands = parser.add_subparsers(dest="command", required=True)

    corpus = commands.add_parser(
        "corpus", formatter_class=HelpFormatter, help="assemble the corpus and its train/validation/test split"
    )
    corpus.add_argument("--out", type=Path, help=f"default: {DEFAULT_CORPUS_DIR} (required with --files)")
    corpus.add_argument("--cache", type=Path, default=DEFAULT_CACHE_DIR, help="where source packages are unpacked")
    corpus.add_argument("--files", type=Path, nargs="+", help="your own text files or directories instead")
    corpus.set_defaults(run=_corpus)

    tokenizer = commands.add_parser(
        "tokenizer", formatter_class=HelpFormatter, help="train the byte-level BPE tokenizer on the train split"
    )
    tokenizer.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS_DIR)
    tokenizer.add_argument("--vocab", type=int, default=4096)
    tokenizer.add_argument("--out", type=Path, default=DEFAULT_TOKENIZER_DIR)
    tokenizer.set_defaults(run=_tokenizer)

    train = commands.add_parser(
        "train", formatter_class=HelpFormatter, help="train a model (rerun to resume after a kill)"
    )
    train.add_argument("output", type=Path)
    train.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER_DIR)
    train.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS_DIR)
    train.add_argument("--device", default="cpu")
    train.add_argument("--threads", type=int, default=torch.get_num_threads())
    train.add_argument("--keep-state", action="store_true", help="keep trainer_state.pt after the last step")
    _add_config_flags(train)
    train.set_defaults(run=_train)

    evaluate = commands.add_parser(
        "eval", formatter_class=HelpFormatter, help="perplexity and routing measures of a model on a corpus split"
    )
    evaluate.add_argument("model", type=Path)
    evaluate.add_argument("--split", default="test", choices=SPLITS)
    evaluate.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS_DIR)
    evaluate.add_argument("--threads", type=int, default=torch.get_num_threads())
    evaluate.add_argument(
        "--write-card", action="store_true", help="save eval_<split>.json in MODEL (and README.md, for the test split)"
    )
    evaluate.set_defaults(run=_eval)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (CorpusError, ValueError, FileNotFoundError) as exc:
        print(f"moe-train {args.command}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
