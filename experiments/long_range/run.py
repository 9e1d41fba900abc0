"""The long-range study as a script: the same as ``rnndrop study long-range``.

python experiments/long_range/run.py --quick
python experiments/long_range/run.py --config experiments/long_range/full.yaml --workers 2
"""

import sys

from rnndrop.study.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["long-range", *sys.argv[1:]]))
