"""One list of sites (issue 21, section 3) and the study hashes that must not move with it.

Published results (``docs/results/*``) carry each run's configuration hash; a study reuses a
finished run only when the hash matches. A new :class:`RecurrentDropout` field (a site, an
option) must leave every published hash as it is; these tests fail if it does not.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest

from rnndrop.config import RATE_FIELDS, SITES, RecurrentDropout, TransformerDropout
from rnndrop.study.base import V1_DROPOUT_FIELDS, Study, dropout_spec, spec_hash
from rnndrop.study.context import ContextStudyConfig, load_context_study
from rnndrop.study.inference import InferenceStudyConfig, load_inference_study

ROOT = Path(__file__).parents[1]

# RecurrentDropout() as the published specs hold it, written out by hand (not by the code)
V1_DEFAULTS = {
    "embedding": 0.0, "input": 0.0, "between_layers": 0.0, "recurrent": 0.0, "output": 0.0,
    "candidate": 0.0, "weight_hh": 0.0, "zoneout_hidden": 0.0, "zoneout_cell": 0.0,
    "time": "per_sequence", "batch": "per_sample", "tied": True,
    "embedding_batch": "per_batch", "scaling": "inverted",
}  # fmt: skip


def _extended(**extra: object) -> type:
    """RecurrentDropout with new fields (name -> default): a site or option added later."""
    return dataclasses.make_dataclass(
        "Extended", [(n, type(d), d) for n, d in extra.items()], bases=(RecurrentDropout,),
        frozen=True,
    )  # fmt: skip


# --- the published hashes ------------------------------------------------------------------


@pytest.mark.parametrize(
    "load, config, results, literal",
    [
        (load_context_study, "experiments/long_range/context_ptb_short.yaml",
         "docs/results/context/context.csv", (("none", "0"), "08702677e748")),
        (load_inference_study, "experiments/inference/delayed_recall.yaml",
         "docs/results/inference/inference.csv", (("none", "0"), "7f573c7032cb")),
    ],
    ids=["context", "inference"],
)  # fmt: skip
def test_published_context_and_inference_hashes(load, config, results, literal):
    """The published runs keep their hashes (the CSVs hold the hashes written when they ran;
    the long-range study's are checked in test_study_v3)."""
    study = load(ROOT / config)
    hashes = {(c.label, str(c.seed)): study.cell_hash(c) for c in study.cells()}
    rows = list(csv.DictReader((ROOT / results).open()))
    published = {(r["label"], r["seed"]): r["config_hash"] for r in rows}
    assert len(published) >= 4
    assert {k: hashes.get(k) for k in published} == published
    key, value = literal  # copied from the CSV by hand
    assert hashes[key] == value


def test_default_dropout_spec_is_the_published_one():
    """A field of the published set whose name or default changed would move every hash."""
    assert dropout_spec(RecurrentDropout()) == V1_DEFAULTS
    inference = dropout_spec(RecurrentDropout(), InferenceStudyConfig._DROPOUT_FIELDS)
    assert inference == {**V1_DEFAULTS, "concrete": False, "temperature": 0.1}
    assert set(V1_DROPOUT_FIELDS) == set(V1_DEFAULTS)


@pytest.mark.parametrize("published", [V1_DROPOUT_FIELDS,
                                       InferenceStudyConfig._DROPOUT_FIELDS])  # fmt: skip
def test_a_new_field_at_its_default_changes_no_spec(published):
    """A site or option added to RecurrentDropout (here by subclassing) is in a run's spec only
    when it is set: no list needs editing for the published hashes to hold."""
    cls = _extended(new_site=0.0, new_switch=False)
    base = dropout_spec(RecurrentDropout(recurrent=0.25), published)
    assert dropout_spec(cls(recurrent=0.25), published) == base
    assert dropout_spec(cls(recurrent=0.25, new_site=0.5), published) == {**base, "new_site": 0.5}
    assert dropout_spec(cls(new_switch=True), published)["new_switch"] is True
    # and the hash of a whole spec follows
    assert spec_hash({"dropout": dropout_spec(cls(), published)}) == spec_hash(
        {"dropout": dropout_spec(RecurrentDropout(), published)}
    )


def test_later_fields_are_hashed_when_set():
    """concrete and temperature (added after v1) are left out at their defaults only."""
    spec = dropout_spec(RecurrentDropout(recurrent=0.25, concrete=True, temperature=0.2))
    assert spec["concrete"] is True and spec["temperature"] == 0.2
    assert "concrete" not in dropout_spec(RecurrentDropout(recurrent=0.25))


def test_transformer_dropout_is_hashed_whole():
    assert dropout_spec(TransformerDropout(attention=0.1)) == {
        "embedding": 0.0, "attention": 0.1, "residual": 0.0, "ffn": 0.0, "drop_path": 0.0,
    }  # fmt: skip


def test_hash_formula_is_frozen():
    """sha256 of the sorted JSON, 12 hex digits; the digest below was computed by hand with
    sha256sum for this literal spec: {"a": [0.5, null], "b": 1}."""
    assert spec_hash({"b": 1, "a": [0.5, None]}) == "7be76337a4b4"  # sha256sum of the JSON


# --- one list of sites ----------------------------------------------------------------------


def test_rate_fields_and_docs_come_from_sites():
    assert tuple(SITES) == RATE_FIELDS
    names = [f.name for f in dataclasses.fields(RecurrentDropout)]
    assert names[: len(SITES)] == list(SITES)
    doc = RecurrentDropout.__doc__ or ""
    for name in SITES:
        assert f"\n        {name}: " in doc, name
    assert "{sites}" not in doc and "{policy_sites}" not in doc and "{gated_sites}" not in doc
    # the policy and tied lists name exactly the sites the table marks
    assert "Mask policy (for input, between_layers, recurrent, output, candidate and cell)" in doc
    assert "on input, between_layers and recurrent." in " ".join(doc.split())


def test_a_field_missing_from_sites_fails_at_import():
    """The check the config module runs on RecurrentDropout, on classes that break it."""
    from rnndrop.config import _check_rate_fields

    swapped = dataclasses.make_dataclass(
        "Swapped", [(n, float, 0.0) for n in reversed(SITES)], frozen=True
    )
    with pytest.raises(TypeError, match="rates of SITES"):
        _check_rate_fields(swapped)
    missing = dataclasses.make_dataclass(
        "Missing", [(n, float, 0.0) for n in list(SITES)[:-1]], frozen=True
    )
    with pytest.raises(TypeError, match="rates of SITES"):
        _check_rate_fields(missing)


def test_a_site_that_names_its_cells_must_say_why_others_lack_it(monkeypatch):
    """check_cell's refusal gives each site's reason (Site.lacks): a site listing its cells
    without one fails at import."""
    from rnndrop import config

    site = dataclasses.replace(config.SITES["cell"], lacks="")
    monkeypatch.setitem(config.SITES, "cell", site)
    with pytest.raises(TypeError, match=r"\['cell'\] list their cells but not `lacks`"):
        config._check_rate_fields(RecurrentDropout)


# --- the base class -------------------------------------------------------------------------


def test_studies_share_the_base_fields():
    shared = [f.name for f in dataclasses.fields(Study)]
    assert len(shared) == 12
    for cls in (ContextStudyConfig, InferenceStudyConfig):
        assert issubclass(cls, Study)
        assert [f.name for f in dataclasses.fields(cls)][:12] == shared
    from rnndrop.study import StudyConfig

    assert issubclass(StudyConfig, Study)


def test_old_run_names_are_aliases():
    from rnndrop.study import Cell, LongRangeRun, Run
    from rnndrop.study.context import ContextCell
    from rnndrop.study.inference import InferenceCell

    assert Cell is LongRangeRun and ContextCell is Run and InferenceCell is Run
    assert str(Run("variational", 0.25, 1)) == "variational_p0.25 seed=1"
    assert str(LongRangeRun("none", None, 20, 0, "copy")) == "copy none d=20 seed=0"


def test_load_result_checks_the_hash(tmp_path):
    import json

    study = ContextStudyConfig(corpus="folder", data_dir=str(tmp_path), out_dir=str(tmp_path),
                               schemes=["none"])  # fmt: skip
    (run,) = study.cells()
    assert study.load_result(run) is None
    study.cell_dir(run).mkdir(parents=True)
    (study.cell_dir(run) / "result.json").write_text(json.dumps({"config_hash": "stale"}))
    assert study.load_result(run) is None
    assert study.load_result(run, any_hash=True) == {"config_hash": "stale"}
    (study.cell_dir(run) / "result.json").write_text(
        json.dumps({"config_hash": study.cell_hash(run), "x": 1})
    )
    assert study.load_result(run)["x"] == 1
