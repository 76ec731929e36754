"""``benchmarks/memory_soak.py`` at toy size: every technique cycles, RSS is read, the table prints."""


def test_memory_soak_runs_every_technique_and_reads_rss(load_bench, threads, tmp_path, capsys):
    bench = load_bench("memory_soak")
    res = bench.main(["--cycles", "3", "--calls", "2", "--warmup", "1", "--out", str(tmp_path / "m.json")])
    names = [r["name"] for r in res["rows"]]
    assert len(names) == 5 and names[-1].startswith("SkipStableDiffusionPipeline")
    assert all(r["iterations"] == (2 if r is res["rows"][-1] else 3) for r in res["rows"])
    assert all(len(r["rss_mb"]) >= 2 and r["max"] >= r["first"] > 0 for r in res["rows"])
    assert (tmp_path / "m.json").is_file()
    assert "| apply/generate/remove layer_skip | 3 |" in capsys.readouterr().out
