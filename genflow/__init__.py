"""genflow: deep generative models on CelebA 64x64 with DVC, Ray Train/Tune and MLflow."""

from genflow._telemetry import disable_telemetry

# Nothing phones home: set before Ray, MLflow or DVC is imported anywhere in the process.
disable_telemetry()

__version__ = "0.1.0"
