"""DVC stage prepare: `python -m pipelines.prepare` -> data.shards, from data.source (the stage's
path dependency: a changed image there makes DVC prepare again). As `genflow data prepare` does.

dvc.yaml depends on the path data.source names, and DVC cannot turn the keyword `sample` into
data.sample.dir; so the project holds `sample`, a link to data/sample (the default
data.sample.dir), and `dvc exp run -S data.source=sample` hashes the sample through it."""

from pathlib import Path

from genflow.config import ParamsError
from genflow.data.shards import prepare
from pipelines.common import stage_params

if __name__ == "__main__":
    data = stage_params().data
    if data.source == "sample" and Path("sample").resolve() != Path(data.sample.dir).resolve():
        raise ParamsError(f"data.source=sample: in the pipeline that names the link `sample` (-> "
                          f"{Path('sample').resolve()}), which DVC hashes, not data.sample.dir={data.sample.dir}; "
                          f"give the sample by its path: dvc exp run -S data.source={data.sample.dir}")
    prepare(data)
