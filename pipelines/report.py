"""DVC stage report: `python -m pipelines.report` -> reports/ (after every evaluate@FAMILY)."""

from genflow.eval.compare import report
from pipelines.common import stage_params

if __name__ == "__main__":
    written = report(stage_params())
    print(f"wrote {written['html']}")
