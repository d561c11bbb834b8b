"""bench/sampler.py runs end to end (its figures are measurements, never asserted) and rejects bad options."""

import pytest

pytest.importorskip("mlx_lm")
from openelm_mlx.bench import sampler as bench  # noqa: E402


def test_sampler_bench_prints_a_row_per_setting(capsys):
    assert bench.main(["--tokens", "2", "--repeats", "1", "--warmup", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ["logits"] * len(bench.SETTINGS) + ["decode"] * (len(bench.SETTINGS) + 1)
    assert all(r[-1].endswith("x") and float(r[-1][:-1]) > 0 for r in rows)  # mlx-lm / ours
    assert "ours uncompiled" in lines[1]


@pytest.mark.parametrize("argv", [["--tokens", "1"], ["--repeats", "0"], ["--warmup", "-1"]])
def test_sampler_bench_rejects_bad_options_in_one_line(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "error:" in err, err
