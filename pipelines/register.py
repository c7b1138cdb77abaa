"""DVC stage register@FAMILY: `python -m pipelines.register vae` -> metrics/register/vae.json."""

import sys

from genflow.track.registry import register_family
from pipelines.common import write_json
from pipelines.family import family_params

if __name__ == "__main__":
    family = sys.argv[1]
    version = register_family(family, family_params(family))
    write_json(f"metrics/register/{family}.json", {"model": version.name, "version": int(version.version), "alias": "candidate"})
    print(f"registered {version.name} version {version.version} (alias candidate)")
