"""`mim export RUN_DIR_OR_CHECKPOINT --out DIR`: a backbone downstream teams load with timm alone:
model.safetensors (timm names, encoder only), config.json, README.md (a model card with the Hub's
metadata; the folder loads with `timm.create_model("local-dir:DIR", pretrained=True)`). A
parameter-efficient fine-tune (finetune.method) also writes its trained weights alone,
adapter.safetensors and adapter.json, and the merged model only where its method merges."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mim.export import export
from mim.model_card import CardInfo
from pipelines.common import reports_user_errors


@reports_user_errors("mim export")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mim export", description=__doc__)
    parser.add_argument("source", help="a mim run dir (its newest complete checkpoint) or a checkpoint dir")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16"], help="weights dtype (default fp32)"
    )
    parser.add_argument(
        "--with-decoder", action="store_true", help="also write decoder.safetensors (pretraining)"
    )
    parser.add_argument(
        "--adapter-only",
        action="store_true",
        help="a parameter-efficient fine-tune: only adapter.safetensors and adapter.json",
    )
    parser.add_argument(
        "--dataset", help="the pretraining data's name in the model card (default: its shards' folder name)"
    )
    parser.add_argument("--license", default="other", help="a Hugging Face Hub licence key, e.g. apache-2.0")
    parser.add_argument(
        "--results",
        nargs="+",
        type=Path,
        default=[],
        metavar="RUN_DIR",
        help="linprobe, finetune or segprobe runs of this backbone: their data.val figures go in the card",
    )
    args = parser.parse_args(argv)
    card = CardInfo(args.dataset, args.license, args.results)
    written = export(args.source, args.out, args.dtype, args.with_decoder, args.adapter_only, card)
    print(f"exported to {args.out}: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
