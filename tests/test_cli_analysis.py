"""segscope connectivity / motifs / predict-property as a user runs them on the demo."""

from __future__ import annotations

import csv

from segscope.app.cli import main


def test_connectivity_prints_and_exports(demo96_dir, tmp_path, capsys):
    out = tmp_path / "matrix.csv"
    status = main(
        ["connectivity", "--synapses", str(demo96_dir / "synapses.parquet"),
         "--types", str(demo96_dir / "segments.parquet"), "--out", str(out)]
    )  # fmt: skip
    assert status == 0
    printed = capsys.readouterr().out
    assert "astrocyte" in printed and "excitatory" in printed
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert len(rows) == 16  # four demo types, glia as rows of zeros
    assert sum(int(r["synapses"]) for r in rows if "astrocyte" in (r["pre_type"], r["post_type"])) == 0


def test_motifs_reports_the_planted_reciprocity(demo96_dir, tmp_path, capsys):
    out = tmp_path / "census.csv"
    status = main(
        ["motifs", "--synapses", str(demo96_dir / "synapses.parquet"), "--types", str(demo96_dir / "segments.parquet"),
         "--type", "excitatory", "--null", "type", "--samples", "20", "--out", str(out)]
    )  # fmt: skip
    assert status == 0
    rows = {r["motif"]: r for r in csv.DictReader(out.read_text().splitlines())}
    assert float(rows["reciprocal"]["z"]) > 5


def test_bad_inputs_end_in_one_line(demo96_dir, tmp_path, capsys):
    bad = tmp_path / "syn.csv"
    bad.write_text("pre,post\n1,2\n")
    status = main(["connectivity", "--synapses", str(bad), "--types", str(demo96_dir / "segments.parquet")])
    assert status == 2
    assert "lacks column(s) pre_segment" in capsys.readouterr().err
    status = main(
        ["motifs", "--synapses", str(demo96_dir / "synapses.parquet"), "--types", str(demo96_dir / "segments.parquet"),
         "--type", "pyramidal"]
    )  # fmt: skip
    assert status == 2 and "no segment has type 'pyramidal'" in capsys.readouterr().err
    status = main(
        ["predict-property", "--embeddings", str(tmp_path / "none.parquet"), "--table",
         str(demo96_dir / "segments.parquet"), "--column", "response_strength"]
    )  # fmt: skip
    assert status == 2 and "does not exist" in capsys.readouterr().err
