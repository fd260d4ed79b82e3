"""Write captioned data as shards, for training on data bigger than memory.

Reads any source mmtransfer reads (an image folder with metadata.jsonl/.csv, a caption
table, a save_to_disk folder, a built-in set), checks it as training would (every image
decoded; on_bad_sample=skip leaves bad samples out), and writes it as shards of
--samples-per-shard samples each:

  --format wds      WebDataset tar shards (open_clip's layout): <key>.png|.jpg (the file's own
                    bytes), <key>.txt (the first caption), <key>.json ({"captions": [...]})
  --format parquet  Parquet shards: __key__, image ({"bytes", "path"}), captions (a list),
                    readable by datasets.load_dataset("parquet", ..., streaming=True) too

plus sizes.json (samples per shard). Keys are the samples' image_id. Train on them with
data.train.name=wds:<output> (or parquet:<output>); see docs/data.md, "Caption data bigger than memory".
Every process x DataLoader worker of a run reads whole shards of its own, so write at least
(processes x train.num_workers) shards, and better many more.

Examples:
  python scripts/write_shards.py my_photos/train --output shards/train --samples-per-shard 1000
  python scripts/write_shards.py captions.csv caption_column=text --output shards/ --format parquet
  python scripts/finetune_captions.py --config configs/caption_folder_template.yaml data.train.name=wds:shards/train
"""

from __future__ import annotations

import argparse
import sys

from mmtransfer.cli import parse_options
from mmtransfer.config import ConfigError
from mmtransfer.data import DataError, load, write_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\nExamples:")[0],
                                     epilog="Examples:" + __doc__.split("Examples:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="the data to write: a folder, a caption table, a saved data set or a built-in name")
    parser.add_argument("options", nargs="*", help="DataConfig options as key=value (caption_column=text, on_bad_sample=skip, ...)")
    parser.add_argument("--output", required=True, help="folder for the shards (created; must not hold shards already)")
    parser.add_argument("--split", default=None, help="split to write (default: the source's default)")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="samples per shard (default 1000; the last shard holds the rest)")
    parser.add_argument("--format", choices=("wds", "parquet"), default="wds", help="wds (tar, default) or parquet")
    parser.add_argument("--overwrite", action="store_true", help="delete the shards already in --output first")
    args = parser.parse_args(argv)
    try:
        dataset = load(args.name, split=args.split, **parse_options(args.options))
        paths = write_shards(dataset, args.output, samples_per_shard=args.samples_per_shard, format=args.format,
                             overwrite=args.overwrite, progress=True)
    except (DataError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Wrote {len(dataset)} samples in {len(paths)} {args.format} shard(s) to {args.output}. Train on them with:")
    print(f"  data.train.name={args.format}:{args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
