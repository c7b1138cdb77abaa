"""DVC stage prepare: `python -m pipelines.prepare` -> data.shards, from data.source (the stage's
path dependency: a changed image there makes DVC prepare again). As `genflow data prepare` does.

dvc.yaml depends on the path data.source names, and DVC cannot turn the keyword `sample` into
data.sample.dir; so the project holds `sample`, a link to data/sample (the default
data.sample.dir), and `dvc exp run -S data.source=sample` hashes the sample through it (and
dvc.yaml's dependency on data.sample.dir runs synth first). A checkout without symlinks (Windows
without developer mode, a zip) has a small text file there instead: prepare then refuses the keyword
and names the path to give."""

from pathlib import Path

from genflow.config import ParamsError
from genflow.data.shards import prepare
from pipelines.common import stage_params

if __name__ == "__main__":
    data = stage_params().data
    if data.source == "sample" and Path("sample").resolve() != Path(data.sample.dir).resolve():
        raise ParamsError(f"data.source=sample: in the pipeline that names the link `sample`, which DVC hashes; "
                          f"here it leads to {Path('sample').resolve()} (a checkout without symlinks keeps a "
                          f"text file), not to data.sample.dir={data.sample.dir}; "
                          f"give the sample by its path: dvc exp run -S data.source={data.sample.dir}")
    prepare(data)
