"""Plots are drawn from a metrics JSONL, tolerate a partial last line, and write real PNG files."""

import json

from PIL import Image

from dsv4.train.plots import plot_run, read_metrics


def test_plots_from_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as f:
        for step in range(1, 21):
            row = {"step": step, "loss": 5 - step * 0.1, "lr": min(step, 5) * 1e-4}
            if step % 5 == 0:
                row["val_loss"] = 5 - step * 0.09
                row["expert_load"] = {"1": [step, 2, 3, 4], "3": [1, 1, 1, 1]}
            f.write(json.dumps(row) + "\n")
        f.write('{"step": 21, "loss"')  # killed mid-write
    assert len(read_metrics(path)) == 20
    written = plot_run(path, tmp_path / "plots")
    assert sorted(p.rsplit("/", 1)[1] for p in written) == ["expert_load.png", "loss.png", "lr.png"]
    for p in written:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 300


def test_no_data_no_plots(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n")
    assert plot_run(path, tmp_path / "plots") == []
