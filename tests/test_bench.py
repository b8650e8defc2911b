"""`bnlab bench`'s rows: a ratio is the median of the rounds' paired ratios, shown with their range."""

from bnlab.bench import Bench, print_table


def test_a_row_ratio_is_the_median_of_its_rounds_and_the_table_shows_their_range(capsys):
    bench = Bench.__new__(Bench)  # the rows only: no data set loaded
    bench.rows = []
    bench.add("norms", "bn vs native", 1.2e-3, 1.0e-3, "s/step", ratios=[1.31, 0.97, 1.18])
    bench.add("report", "report", 5.0, 10.0, "s")
    paired, plain = bench.rows
    assert paired["ratio"] == 1.18 and paired["ratios"] == [1.31, 0.97, 1.18]
    assert plain["ratio"] == 0.5 and plain["ratios"] is None
    print_table(bench.rows)
    out = capsys.readouterr().out
    assert "1.18 (0.97-1.31)" in out
    assert "0.50 " in out and "0.50 (" not in out
