"""DVC stage evaluate@FAMILY: `python -m pipelines.evaluate vae` -> metrics/evaluate/vae.json."""

import sys

from genflow.eval.report import evaluate_family
from pipelines.common import write_json
from pipelines.family import family_params

if __name__ == "__main__":
    family = sys.argv[1]
    write_json(f"metrics/evaluate/{family}.json", evaluate_family(family, family_params(family)))
