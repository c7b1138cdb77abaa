"""Rank-0 logging: queued off the training thread, nothing lost, errors surface, nothing logged twice on resume."""

import threading

import pytest
from mlflow import MlflowClient

from genflow.track.mlflow import RankZeroLogger, TrackingError, run_location


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one takes seconds)."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("logger", artifact_location=(folder / "artifacts").as_uri())


@pytest.fixture
def run(store):
    uri, client, experiment = store
    return uri, client, client.create_run(experiment).info.run_id


def test_every_queued_metric_and_tag_is_written_by_flush(run):
    uri, client, run_id = run
    logger = RankZeroLogger(uri, run_id)
    for step in range(25):
        logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    logger.set_tag("genflow.note", "written")
    logger.flush()
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(25))
    assert client.get_run(run_id).data.tags["genflow.note"] == "written"
    logger.log_metrics({"train/last": 3.0}, 25)
    logger.close()  # close flushes too
    assert client.get_metric_history(run_id, "train/last")[0].value == 3.0


def test_logging_does_not_wait_for_the_store(run):
    uri, _, run_id = run
    logger = RankZeroLogger(uri, run_id)
    release = threading.Event()
    logger._submit(release.wait)  # a store that hangs until released
    logger.log_metrics({"train/loss": 1.0}, 0)  # returns at once, queued behind the hung call
    assert logger._queue.unfinished_tasks == 2
    release.set()
    logger.close()


def test_an_error_on_the_logging_thread_is_raised_in_the_training_thread(run):
    uri, client, run_id = run
    logger = RankZeroLogger(uri, run_id)
    client.delete_run(run_id)  # the store now refuses writes to it
    logger.log_metrics({"train/loss": 1.0}, 0)
    with pytest.raises(TrackingError, match=run_id):
        logger.flush()
    logger.close()


def test_a_resumed_run_logs_each_metric_step_once(run):
    # Rank-0 logging into a resumed run: steps already in the history are not logged twice.
    uri, client, run_id = run
    first = RankZeroLogger(uri, run_id)
    first.log_metrics({"train/start_step": 0}, 0)
    for step in range(10, 80, 10):  # interrupted at 70, last checkpoint at 40
        first.log_metrics({"train/loss": 1.0 / step}, step)
    first.close()

    resumed = RankZeroLogger(uri, run_id)
    resumed.log_metrics({"train/start_step": 40}, 40)
    for step in range(50, 110, 10):
        resumed.log_metrics({"train/loss": 2.0 / step, "val/kl": 0.5}, step)
    resumed.close()

    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(10, 110, 10))
    # The points of steps 50-70 are the first attempt's (the same steps, trained again from the checkpoint).
    assert {m.step: m.value for m in history}[60] == 1.0 / 60
    assert [m.value for m in client.get_metric_history(run_id, "train/start_step")] == [0, 40]
    assert len(client.get_metric_history(run_id, "val/kl")) == 6


def test_grids_are_step_keyed_images_and_progress_lines_print_in_order(run, capsys):
    # MLflow's image view (a step slider per key) reads images/KEY+step+STEP+... and the loggedImages tag.
    from PIL import Image

    uri, client, run_id = run
    logger = RankZeroLogger(uri, run_id)
    for step in (10, 20):
        logger.log_image(Image.new("RGB", (8, 8), (step, 0, 0)), "samples", step)
        logger.say(lambda step=step: f"step {step}")
    logger.close()
    names = [a.path for a in client.list_artifacts(run_id, "images")]
    for step in (10, 20):
        assert sum(name.startswith(f"images/samples+step+{step}+") and name.endswith(".png") for name in names) == 1
    assert client.get_run(run_id).data.tags["mlflow.loggedImages"] == "True"
    assert capsys.readouterr().out.splitlines() == ["step 10", "step 20"]
    resumed = RankZeroLogger(uri, run_id)  # resumed from step 10's checkpoint: step 20 is drawn again
    for step in (20, 30):
        resumed.log_image(Image.new("RGB", (8, 8)), "samples", step)
    resumed.close()
    names = [a.path for a in client.list_artifacts(run_id, "images")]
    assert [sum(f"+step+{step}+" in name for name in names) for step in (10, 20, 30)] == [2, 2, 2]  # png + webp each


@pytest.mark.parametrize("uri, expected", [
    ("http://mlflow.example:5000/", "http://mlflow.example:5000/#/experiments/7/runs/abc"),
    ("sqlite:////p/mlflow.db", "abc in sqlite:////p/mlflow.db; browse it: mlflow ui --backend-store-uri "
                               "sqlite:////p/mlflow.db, then http://127.0.0.1:5000/#/experiments/7/runs/abc"),
])
def test_a_runs_location_is_its_page_or_the_command_that_serves_it(uri, expected):
    assert run_location(uri, "7", "abc") == expected


def test_printed_run_locations_carry_no_credentials():
    from genflow.track.mlflow import run_location

    shown = run_location("https://alice:s3cret@mlflow.example:5000", "1", "abc")
    assert shown == "https://mlflow.example:5000/#/experiments/1/runs/abc"
    assert "s3cret" not in run_location("postgresql://bob:pw@db/mlflow", "1", "abc")


def test_a_password_in_a_server_uri_is_refused_before_any_request(monkeypatch):
    from genflow.config import TrackingParams
    from genflow.track.mlflow import configure

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:hunter2-secret@127.0.0.1:1")  # port 1: nothing answers
    with pytest.raises(TrackingError, match=r"URI http://127\.0\.0\.1:1 carries a password") as refused:
        configure(TrackingParams())
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize("code,login,says", [
    ("UNAUTHENTICATED", None, "requires a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
    ("UNAUTHENTICATED", "alice", "refused the login of user 'alice' (HTTP 401): check MLFLOW_TRACKING_PASSWORD"),
    ("PERMISSION_DENIED", "alice", "refused user 'alice' that request (HTTP 403, permission denied): ask its admin"),
    ("RESOURCE_DOES_NOT_EXIST", "alice", None),  # not a refusal: the caller's own error stands
])
def test_a_servers_refusal_says_what_to_set(code, login, says, monkeypatch, tmp_path):
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2

    from genflow.track.mlflow import login_error

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.mlflow/credentials
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    if login:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", login)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-this-one")
    error = login_error("http://mlflow.example:5000", MlflowException("refused", error_code=getattr(databricks_pb2, code)))
    if says is None:
        assert error is None
    else:
        assert str(error).startswith(f"the MLflow tracking server http://mlflow.example:5000 {says}")
        assert "not-this-one" not in str(error)


def test_a_new_experiment_keeps_its_artifacts_where_tracking_artifact_location_says(tmp_path, s3_bucket, capsys):
    import mlflow

    from genflow import storage
    from genflow.config import TrackingParams
    from genflow.track.mlflow import configure

    tracking = TrackingParams(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="remote",
                              artifact_location=f"{s3_bucket}/mlartifacts/")
    experiment_id = configure(tracking)
    assert MlflowClient().get_experiment(experiment_id).artifact_location == f"{s3_bucket}/mlartifacts"
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_text("a grid, say", "notes/a.txt")  # MLflow's boto3 finds the server by AWS_ENDPOINT_URL
    assert storage.read_text(f"{s3_bucket}/mlartifacts/{run.info.run_id}/artifacts/notes/a.txt") == "a grid, say"
    # An existing experiment keeps the location it was made with, and the user is told.
    moved = tracking.model_copy(update={"artifact_location": str(tmp_path / "elsewhere")})
    assert configure(moved) == experiment_id
    assert f"keeps its artifacts in {s3_bucket}/mlartifacts" in capsys.readouterr().err


def test_a_local_artifact_location_is_a_file_uri_and_an_unknown_scheme_is_refused(tmp_path, monkeypatch):
    from genflow.storage import StorageError
    from genflow.track.mlflow import artifact_location

    monkeypatch.chdir(tmp_path)
    assert artifact_location("artifacts") == (tmp_path / "artifacts").as_uri() and artifact_location("") == ""
    with pytest.raises(StorageError, match="ftp://host/x: unknown storage scheme"):
        artifact_location("ftp://host/x")


def test_a_password_in_a_database_uri_is_refused_too(monkeypatch):
    # It would travel to every Train worker's runtime_env (genflow.track.mlflow.worker_env).
    from genflow.config import TrackingParams
    from genflow.track.mlflow import configure

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://alice:hunter2-secret@db.example/mlflow")
    with pytest.raises(TrackingError, match=r"URI postgresql://db\.example/mlflow carries a password.*PGPASSWORD") as refused:
        configure(TrackingParams())
    assert "hunter2" not in str(refused.value)
