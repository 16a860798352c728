"""`hires-lmm generate`: answer questions about images with a released checkpoint folder.

    hires-lmm generate --model ConvLLaVA-sft-1536 --vision-tower ConvLLaVA-ConvNeXt-1536 \\
        --image invoice.png --prompt "What is the total amount?" --temperature 0 --dtype bf16

--image / --prompt may be repeated: one request per pair, run as one batch. --json prints one
JSON object per request (text, token_ids, prompt_ids, finish_reason), in order; --stream prints the
answer while it is generated (requests one after the other). Also runs standalone:
`python -m hires_lmm.lmm.cli_generate ...`.
"""
import argparse
import json
import logging
import sys

import torch

__all__ = ["add_arguments", "run", "main"]

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
           "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the released checkpoint folder")
    parser.add_argument("--vision-tower", default=None,
                        help="local folder of the tower config.json's mm_vision_tower names (needed "
                             "when the checkpoint does not hold the tower's weights)")
    parser.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    parser.add_argument("--prompt", action="append", default=[], help="question (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default: generation_config.json's, else 512")
    parser.add_argument("--temperature", type=float, default=None,
                        help="0: greedy; default: generation_config.json's")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None,
                        help="stop string (repeatable); the text is cut before it")
    parser.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                        help="default: the checkpoint's")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if visible)")
    parser.add_argument("--conv-template", default=None, choices=["vicuna_v1", "llama3", "raw"],
                        help="default: the checkpoint's (vicuna_v1 for ConvLLaVA)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="the tower's input resolution when neither folder says it")
    parser.add_argument("--long-prompt", default="truncate", choices=["truncate", "error"],
                        help="a prompt over tokenizer_model_max_length: cut as LLaVA does, or fail")
    parser.add_argument("--no-cuda-graph", action="store_true", help="decode steps run eagerly")
    parser.add_argument("--stream", action="store_true", help="print text as it is generated")
    parser.add_argument("--json", action="store_true", help="one JSON object per request")


def run(args: argparse.Namespace) -> int:
    from .auto import load
    if not args.prompt:
        print("hires-lmm generate: give at least one --prompt", file=sys.stderr)
        return 2
    images = list(args.image)
    if images and len(images) != len(args.prompt):
        print(f"hires-lmm generate: {len(images)} --image but {len(args.prompt)} --prompt; give one "
              f"image per prompt", file=sys.stderr)
        return 2
    if not images:
        images = [None] * len(args.prompt)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = load(args.model, vision_tower=args.vision_tower,
                     dtype=_DTYPES[args.dtype] if args.dtype else None, device=device,
                     image_size=args.image_size, conv_template=args.conv_template)
        gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop,
                   long_prompt=args.long_prompt, cuda_graph=not args.no_cuda_graph)
        if args.stream and not args.json:
            for im, q in zip(images, args.prompt):
                for piece in model.chat(im, q, stream=True, **gen):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                sys.stdout.write("\n")
            return 0
        out = model.generate(images, args.prompt, **gen)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"hires-lmm generate: error: {e}", file=sys.stderr)
        return 1
    for r in out:
        print(json.dumps(r) if args.json else r["text"])
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="hires-lmm generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
