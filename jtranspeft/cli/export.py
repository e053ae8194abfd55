"""``python -m jtranspeft.export``: write an adapter, or a base merged with one, for llama.cpp (and ollama).

Parses the arguments and calls `jtranspeft.checkpoints.gguf_export.export_gguf`; prints its summary as JSON.
Bad input (a missing file, a malformed adapter, an adapter llama.cpp cannot apply as a LoRA) is one line on
stderr and exit status 2, with nothing written.
"""

from __future__ import annotations

import argparse
import json
import sys

from jtranspeft.cli.common import add_logging_flags, cli_main, setup_logging, usage_name

EXAMPLES = """examples:
  # a LoRA adapter (PEFT directory) as a llama.cpp adapter GGUF, for the base it was trained on
  python -m jtranspeft.export --adapter runs/quickstart/adapter --base smollm2 --format gguf-lora \\
      --out runs/quickstart/adapter.gguf
  #   then: llama-cli -m base.gguf --lora runs/quickstart/adapter.gguf   (or ollama's ADAPTER line)
  # the base with any family's adapter merged in, as a GGUF base (tokenizer and chat template copied)
  python -m jtranspeft.export --adapter runs/dora/adapter --base smollm2 --format gguf --dtype q8_0 \\
      --out runs/dora/merged.gguf
  # the bundled Q4_1 SmolLM2 re-written as float32 (no adapter): a base llama.cpp runs without quantisation noise
  python -m jtranspeft.export --base smollm2 --format gguf --out smollm2-f32.gguf
  # an HF directory base: take the tokenizer metadata from a GGUF of the same vocabulary
  python -m jtranspeft.export --base ./my-llama --adapter runs/a/adapter --format gguf \\
      --tokenizer-from my-llama.gguf --out merged.gguf
"""


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (see --help)."""
    parser = argparse.ArgumentParser(prog=usage_name("export"), description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True,
                        help='the base the adapter was made for: HF checkpoint directory, .gguf file or "smollm2"')
    parser.add_argument("--adapter", help="adapter: a PEFT directory of any family, or a llama.cpp LoRA .gguf "
                                          "(required for --format gguf-lora)")
    parser.add_argument("--format", required=True, choices=("gguf-lora", "gguf"),
                        help="gguf-lora: a llama.cpp LoRA adapter (LoRA only; DoRA, SHiRA, RoSA, bottleneck: merge "
                             "instead); gguf: the base with the adapter merged in")
    parser.add_argument("--out", required=True, help="the .gguf file to write (must not exist)")
    parser.add_argument("--dtype", default="f32", choices=("f32", "f16", "bf16", "q8_0"),
                        help="tensor type (default f32; q8_0 falls back to f16 for rows not a multiple of 32 "
                             "values; norms stay f32)")
    parser.add_argument("--tokenizer-from", metavar="GGUF",
                        help="--format gguf: copy tokenizer and chat template metadata from this GGUF (default: "
                             "--base when it is a .gguf)")
    add_logging_flags(parser)
    return parser


@cli_main
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    from jtranspeft.checkpoints.gguf_export import export_gguf

    summary = export_gguf(args.base, args.out, adapter=args.adapter, format=args.format, dtype=args.dtype,
                          tokenizer_from=args.tokenizer_from)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
