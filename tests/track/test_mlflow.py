"""Rank-0 logging into a resumed run: steps already in the history are not logged twice."""

from mlflow import MlflowClient

from genflow.track.mlflow import RankZeroLogger


def test_a_resumed_run_logs_each_metric_step_once(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    first = RankZeroLogger(uri, run_id)
    first.log_metrics({"train/start_step": 0}, 0)
    for step in range(10, 80, 10):  # interrupted at 70, last checkpoint at 40
        first.log_metrics({"train/loss": 1.0 / step}, step)

    resumed = RankZeroLogger(uri, run_id)
    resumed.log_metrics({"train/start_step": 40}, 40)
    for step in range(50, 110, 10):
        resumed.log_metrics({"train/loss": 2.0 / step, "val/kl": 0.5}, step)

    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(10, 110, 10))
    # The points of steps 50-70 are the first attempt's (the same steps, trained again from the checkpoint).
    assert {m.step: m.value for m in history}[60] == 1.0 / 60
    assert [m.value for m in client.get_metric_history(run_id, "train/start_step")] == [0, 40]
    assert len(client.get_metric_history(run_id, "val/kl")) == 6
