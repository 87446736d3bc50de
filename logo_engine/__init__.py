"""LoGo: per-request LoRA adapter selection and merging (arXiv 2511.07129) on transformers.

>>> from logo_engine import LoGoEngine
>>> engine = LoGoEngine.from_pretrained()          # the embedded default model and adapter zoo
>>> engine.route("Convert 3 km to metres").adapters
"""

from logo_engine.base import AsyncTextStream, TextStream
from logo_engine.errors import (
    AdapterIncompatibleError,
    AdapterLoadError,
    AdapterMemoryError,
    AdapterNotFoundError,
    AuthenticationError,
    ContextLengthError,
    EngineClosedError,
    ExportError,
    GenerationError,
    InvalidRequestError,
    LoGoError,
    MixtureRankError,
    ModelLoadError,
    ModelNotFoundError,
    NumericalError,
    RemoteError,
    RoutingConfigError,
    UnsafeAdapterError,
)
from logo_engine.types import (
    Calibration,
    Generation,
    InvalidToolCall,
    PrefixCacheConfig,
    RoutingConfig,
    Selection,
    ToolCall,
    Usage,
)

__all__ = [
    "AdapterIncompatibleError",
    "AdapterLoadError",
    "AdapterMemoryError",
    "AdapterNotFoundError",
    "AsyncTextStream",
    "AuthenticationError",
    "Calibration",
    "ContextLengthError",
    "EngineClosedError",
    "ExportError",
    "Generation",
    "GenerationError",
    "InvalidRequestError",
    "InvalidToolCall",
    "LoGoEngine",
    "LoGoError",
    "MixtureRankError",
    "ModelLoadError",
    "ModelNotFoundError",
    "NumericalError",
    "RemoteEngine",
    "RemoteError",
    "PrefixCacheConfig",
    "RoutingConfig",
    "RoutingConfigError",
    "Selection",
    "TextStream",
    "ToolCall",
    "UnsafeAdapterError",
    "Usage",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # LoGoEngine pulls in transformers model code; import it on first use.
    if name == "LoGoEngine":
        from logo_engine.engine import LoGoEngine

        return LoGoEngine
    if name == "RemoteEngine":  # needs httpx, not torch
        from logo_engine.client import RemoteEngine

        return RemoteEngine
    raise AttributeError(f"module 'logo_engine' has no attribute {name!r}")
