"""Download (or verify) rnndrop's datasets: a thin wrapper around ``rnndrop.data.download``.

python scripts/download_data.py ptb wikitext2 mnist --data-dir data/
python scripts/download_data.py ptb --data-dir ../shared/data/ptb --verify-only
python scripts/download_data.py --list
"""

from rnndrop.data.download import main

if __name__ == "__main__":
    raise SystemExit(main())
