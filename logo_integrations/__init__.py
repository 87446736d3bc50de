"""Framework integrations over the shared LoGo engine.

- :class:`ChatLoGo` (``logo_integrations.langchain``): a LangChain ``BaseChatModel``.
- :class:`LoGoLLM` (``logo_integrations.llama_index``): a LlamaIndex ``FunctionCallingLLM``.

Each is imported on first use, so installing only one framework is enough for it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ChatLoGo", "LoGoLLM"]


def __getattr__(name: str) -> Any:
    if name == "ChatLoGo":
        from logo_integrations.langchain import ChatLoGo

        return ChatLoGo
    if name == "LoGoLLM":
        from logo_integrations.llama_index import LoGoLLM

        return LoGoLLM
    raise AttributeError(f"module 'logo_integrations' has no attribute {name!r}")
