"""`moe-generate`: generate text from a checkpoint on the command line (the offline API in one command)."""

from __future__ import annotations

import logging
import sys

from engine.choices import BACKENDS
from engine.command_line import command_parser
from engine.config import DEFAULT_MODEL_DIR, CheckpointError
from engine.llm import LLM
from engine.sampling_params import SamplingParams


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("moe-generate", "Generate text with an MoE checkpoint (Hugging Face layout).")
    parser.add_argument(
        "model",
        nargs="?",
        default=str(DEFAULT_MODEL_DIR),
        help="model directory: config.json, safetensors, tokenizer.json (the bundled SimBal model by default)",
    )
    parser.add_argument("--prompt", action="append", help="prompt text (repeat for a batch); default: stdin lines")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this probability mass")
    parser.add_argument("--top-k", type=int, default=0, help="sampling: keep the k most likely tokens (0: all)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--stop", action="append", default=[], help="stop at this text (repeat for more)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (the model's by default)")
    parser.add_argument("--moe-backend", default="auto", choices=BACKENDS, help="how experts run (auto: the best here)")
    parser.add_argument(
        "--enforce-eager",
        action="store_const",
        const=True,
        help="run the model eagerly, not compiled (default: $MOE_SERVE_ENFORCE_EAGER, else off)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        parser.error("no prompt given (use --prompt or pipe lines on stdin)")
    try:
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            max_tokens=args.max_tokens,
            stop=args.stop,
        )
        llm = LLM(
            args.model,
            dtype=args.dtype,
            device=args.device,
            max_model_len=args.max_model_len,
            moe_backend=args.moe_backend,
            **({} if args.enforce_eager is None else {"enforce_eager": True}),
        )
        outputs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1)
    except (CheckpointError, ValueError) as exc:
        print(f"moe-generate: error: {exc}", file=sys.stderr)
        return 2
    for output in outputs:
        completion = output.outputs[0]
        print(f"{output.prompt}{completion.text}")
        print(f"[{len(completion.token_ids)} tokens, finish_reason={completion.finish_reason}]\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
