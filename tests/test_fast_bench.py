"""`simclr bench` runs both paths on CPU and reports the numbers it promises."""
from __future__ import annotations

import json

from simclr.cli import main


def test_bench_prints_both_paths_and_the_ratio(tmp_path, capsys, data_root):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--arch", "resnet18", "--width", "8", "--batch_size", "16", "--steps", "2", "--warmup", "1",
               "--train_subset", "64", "--device", "cpu", "--workers", "0", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "reference" in text and "fast" in text and "speed-up (fast / reference images/s)" in text
    res = json.loads(out.read_text())
    ref, fast = res["results"]
    assert (ref["path"], fast["path"]) == ("reference", "fast")
    assert ref["precision"] == "fp32" and ref["lars"] == "plain" and fast["lars"] == "foreach"
    for r in (ref, fast):
        assert r["images_per_s"] > 0 and r["ms_per_step"] > 0 and 0 <= r["data_wait_frac"] <= 1
        # images/s and ms/step describe the same timing: B images per step
        assert abs(r["images_per_s"] * r["ms_per_step"] / 1000 - 16) < 1e-6
    assert abs(res["speedup"] - fast["images_per_s"] / ref["images_per_s"]) < 1e-9
    assert res["commit"] and res["device"].startswith("CPU")


def test_bench_bad_input_is_one_line(capsys):
    assert main(["bench", "--paths", "reference,turbo"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: --paths: unknown path 'turbo'; allowed: reference, fast"
    assert main(["bench", "--steps", "many"]) == 2
    assert "invalid int value" in capsys.readouterr().err
