"""The run's record (bnlab.rundir.writer): scalars.csv and TensorBoard's event file agree, also after a
resume, a half-written CSV row is never data, and the hparams TensorBoard compares runs by."""

from __future__ import annotations

import numpy as np
import pytest

from bnlab.rundir.writer import Recorder, truncate_scalars


def test_partial_last_csv_row_is_never_data(tmp_path):
    path = tmp_path / "scalars.csv"
    path.write_text("step,tag,value\n10,train/loss,0.5\n20,train/loss,0.4\n30,train/lo")
    truncate_scalars(path, from_step=100)
    assert path.read_text() == "step,tag,value\n10,train/loss,0.5\n20,train/loss,0.4\n"
    truncate_scalars(path, from_step=20)
    assert path.read_text() == "step,tag,value\n10,train/loss,0.5\n"


def test_a_resumed_recorder_drops_the_same_steps_from_the_csv_as_from_tensorboard(tmp_path):
    """A checkpoint at step 10: the killed attempt's rows at 11 and later go from both sinks,
    so the resumed run logs step 11 once (log_every=1 logs every step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = Recorder(tmp_path)
    for step in (9, 10, 11, 12):
        first.scalars(step, {"train/loss": 1.0 / step})
    first.close()
    resumed = Recorder(tmp_path, purge_step=11)
    resumed.scalars(11, {"train/loss": 0.5})
    resumed.close()
    assert [tuple(line.split(",")[:1]) for line in (tmp_path / "scalars.csv").read_text().splitlines()[1:]] \
        == [("9",), ("10",), ("11",)]
    board = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0}).Reload().Scalars("train/loss")
    assert [(e.step, e.value) for e in board] == [(9, pytest.approx(1 / 9)), (10, pytest.approx(0.1)),
                                                   (11, 0.5)]


# ---------------------------------------------------------------- TensorBoard HParams
def test_hparams_are_written_into_the_runs_own_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    recorder = Recorder(tmp_path)
    recorder.scalars(10, {"test/acc": 0.75})
    recorder.hparams({"norm.name": "bn", "optim.lr": 0.1, "model.widths": [100, 100],
                      "train.amp": False, "resume": None, "seed": np.int64(3)},
                     {"test/acc": 0.75})
    recorder.close()

    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []  # no sub-run, unlike add_hparams
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    assert set(content) == {metadata.EXPERIMENT_TAG, metadata.SESSION_START_INFO_TAG,
                            metadata.SESSION_END_INFO_TAG}
    start = metadata.parse_session_start_info_plugin_data(
        content[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["norm.name"].string_value == "bn"
    assert start.hparams["optim.lr"].number_value == 0.1
    assert start.hparams["model.widths"].string_value == "[100, 100]"
    assert start.hparams["train.amp"].string_value == "False"
    assert start.hparams["seed"].number_value == 3
    assert "resume" not in start.hparams
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    assert [m.name.tag for m in experiment.metric_infos] == ["test/acc"]
    assert events.Scalars("test/acc")[0].value == 0.75  # the value the dashboard shows
