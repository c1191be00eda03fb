"""Decode every sample of a PASCAL_MT root and list the files that cannot be read.

    python -m ase_model.check_data --data PASCAL_MT [--splits train val]

Exit status 0 when every sample decodes, 1 when some do not (each bad file is listed), 2 for a usage error. The
trainer checks only that the files exist before its first step; this reads them all.
"""

import argparse
import sys

from tqdm import tqdm

from .data import DataError, PascalContextMT


def bad_files(root: str, split: str, show: bool = True) -> list[str]:
    """The messages (each naming a file) of the samples of `split` that fail to decode."""
    dataset = PascalContextMT(root, split)
    bad = []
    for index in tqdm(range(len(dataset)), desc=f"{split}", unit="img", disable=not show):
        try:
            dataset.load(index)
        except DataError as e:
            bad.append(str(e))
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ase_model.check_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="PASCAL_MT root")
    p.add_argument("--splits", nargs="+", default=["train", "val"], help="ImageSets/Context/{split}.txt to check")
    args = p.parse_args(argv)
    bad = []
    for split in args.splits:
        try:
            bad += bad_files(args.data, split)
        except DataError as e:
            print(f"python -m ase_model.check_data: error: --data {args.data}: {e}", file=sys.stderr)
            return 2
    for message in bad:
        print(message)
    print(f"{len(bad)} bad samples" if bad else "every sample decodes", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
