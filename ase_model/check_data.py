"""Decode every sample of a dataset root and list the files that cannot be read.

    python -m ase_model.check_data --data PASCAL_MT [--splits train val]
    python -m ase_model.check_data --dataset nyud --data NYUD_MT

Exit status 0 when every sample decodes, 1 when some do not (each bad file is listed), 2 for a usage error. The
trainer checks before its first step only that the files exist and that their headers and lengths are whole
(`data.probe`); this decodes them all.
"""

import argparse
import sys

from tqdm import tqdm

from . import datasets
from .data import DataError


def bad_files(root: str, split: str, show: bool = True, dataset: str = "pascal_context") -> list[str]:
    """The messages (each naming a file) of the samples of `split` that fail to decode."""
    loader = datasets.get(dataset).loader(root, split)
    bad = []
    for index in tqdm(range(len(loader)), desc=f"{split}", unit="img", disable=not show):
        try:
            loader.load(index)
        except DataError as e:
            bad.append(str(e))
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ase_model.check_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="pascal_context", choices=datasets.names(), help="the dataset's layout")
    p.add_argument("--data", required=True, help="the dataset's root (PASCAL_MT, NYUD_MT)")
    p.add_argument("--splits", nargs="+", default=["train", "val"], help="the splits to check")
    args = p.parse_args(argv)
    bad = []
    for split in args.splits:
        try:
            bad += bad_files(args.data, split, dataset=args.dataset)
        except DataError as e:
            print(f"python -m ase_model.check_data: error: --data {args.data}: {e}", file=sys.stderr)
            return 2
    for message in bad:
        print(message)
    print(f"{len(bad)} bad samples" if bad else "every sample decodes", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
