"""The registered model's code (MLflow's models-from-code): MLflow runs this file to load the model.

Logged by genflow/track/pyfunc.py with genflow's own package as code_paths, so the model loads
where genflow is not installed, and with no pickled object: the model is this code plus the
weights file, which is read with torch.load(weights_only=True). It loads under
MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false.
"""

from mlflow.models import set_model

from genflow.track.sampler import GenerativeSampler

set_model(GenerativeSampler())
