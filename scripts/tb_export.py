"""TensorBoard runs -> CSV / Markdown (same as ``rnndrop export-tb``; rnndrop/study/tbexport.py).

python scripts/tb_export.py runs/quick --tags final/acc --stat last --out table.md
"""

from rnndrop.study.tbexport import main

if __name__ == "__main__":
    raise SystemExit(main())
