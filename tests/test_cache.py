"""`jpaged cache info|clear`: sizes per kind from the files themselves, and exactly what is removed."""

from jpaged.cli import main


def test_cache_info_and_clear(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JPAGED_HOME", str(tmp_path))
    (tmp_path / "executables" / "k").mkdir(parents=True)
    (tmp_path / "executables" / "k" / "a.jex").write_bytes(b"x" * 3 * 2**20)
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "lib.so").write_bytes(b"y" * 2**20)
    assert main(["cache", "info"]) == 0
    rows = {line.split()[0]: line.split()[1:4] for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["executables"] == ["3.0", "MiB", "1"] and rows["kernels"] == ["1.0", "MiB", "1"]
    assert rows["models"] == ["0.0", "MiB", "0"] and rows["total"] == ["4.0", "MiB", "2"]

    assert main(["cache", "clear", "--kind", "executables"]) == 0
    assert "removed executables" in capsys.readouterr().out
    assert not (tmp_path / "executables").exists() and (tmp_path / "kernels" / "lib.so").exists()
    assert main(["cache", "clear", "--kind", "bogus"]) == 1
    assert "unknown cache kind bogus" in capsys.readouterr().err
    assert main(["cache", "clear"]) == 0
    assert not (tmp_path / "kernels").exists()
