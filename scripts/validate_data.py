"""Check a data set before training: open and decode every image, check captions and labels.

Usage:
    python scripts/validate_data.py path/to/images
    python scripts/validate_data.py captions.csv caption_column=text image_root=photos/
    python scripts/validate_data.py openmoji --split test

Extra ``key=value`` arguments are :class:`mmtransfer.data.DataConfig` options.
Exit status: 0 when there are no problems, 1 when some samples are bad (each is
listed with its row, file and reason), 2 when the source cannot be read at all.
"""

from __future__ import annotations

import argparse
import json
import sys

from mmtransfer.cli import parse_options
from mmtransfer.config import ConfigError
from mmtransfer.data import DataError, validate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="a built-in set (openmoji, noto-emoji, mnist5k, usps, mnist_m) or a path")
    parser.add_argument("--split", default=None, help="split to check (default: the source's default)")
    parser.add_argument("--header-only", action="store_true", help="only open the images (fast; misses truncated files)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("options", nargs="*", help="DataConfig options as key=value")
    args = parser.parse_args(argv)
    try:
        options = parse_options(args.options)
        if args.header_only:
            options["verify"] = "header"
        report = validate(args.name, split=args.split, **options)
    except (DataError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=1, ensure_ascii=False) if args.json else report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
