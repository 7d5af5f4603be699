"""supir_core: the SUPIR model, its sampling recipe and checkpoint loading. Knows nothing of HTTP, queues or S3.

Heavy modules (torch, diffusers) are imported by the submodules that need them, so `supir_core.errors`
stays importable in processes without torch.
"""

__version__ = "0.1.0"
