"""`python -m training.run [--config FILE] [--set key=value ...] [--resume latest] [--overwrite]`.

Trains Hyper-SD stages in order (TSCD 8 -> 4 -> 2 -> 1 with the adversarial term, human feedback, score distillation) and merges their LoRAs into one. See docs/training.md; the engine is training/engine/.
"""
from __future__ import annotations

import argparse
import errno
import sys

from training.config import load_config
from training.errors import USER_ERRORS


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m training.run", description=__doc__.splitlines()[2])
    p.add_argument("--config", help="YAML or JSON config (default: the embedded tiny CPU run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--resume", help="'latest' or a checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from training.engine import train

    try:
        return train(load_config(args.config, args.set), args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except OSError as e:  # a full or read-only disk outside the trainer's own writers (training/files.py)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        print(f"error: cannot write {e.filename or 'an output file'}: {e.strerror}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
