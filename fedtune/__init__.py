"""fedtune: federated fine-tuning of small language models on phones and edge devices.

Kept light on purpose: importing ``fedtune`` imports neither torch nor flwr, so the
torch-free device client can live in the same package.
"""

__version__ = "0.1.0"
