"""DVC stage synth: `python -m pipelines.synth` -> data.sample.dir, the synthetic CelebA-format sample
(NOT CelebA; data.sample.n images drawn with data.sample.seed, in the data.sample.layout layout)."""

from genflow.data.synth import write_sample
from pipelines.common import stage_params

if __name__ == "__main__":
    sample = stage_params().data.sample
    write_sample(sample.dir, n=sample.n, layout=sample.layout, seed=sample.seed)
