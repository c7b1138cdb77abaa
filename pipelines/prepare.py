"""DVC stage prepare: `python -m pipelines.prepare` -> data.shards, from data.source (the stage's
path dependency: a changed image there makes DVC prepare again). As `genflow data prepare` does."""

from genflow.data.shards import prepare
from pipelines.common import stage_params

if __name__ == "__main__":
    prepare(stage_params().data)
