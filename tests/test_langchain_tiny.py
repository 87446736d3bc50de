"""langchain-tests standard suites for ChatLoGo over a tiny real model with real trained adapters.

ChatLoGo is built here from ``LoGoEngine.from_pretrained`` arguments (a base-model folder and an
adapter folder), so these suites also exercise the lazy, process-wide shared engine: the weights
load on the first call, never in ``__init__``, and every test's model object shares them. The
model is a 2-layer random transformer (tests/tiny.py) with three adapters trained on toy tasks, so
its text is gibberish: tests that need a model that follows tool prompts are xfailed with that
reason; everything else (templates, routing, streaming, batching, usage, metadata) runs for real.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import tiny
from langchain_core.language_models import BaseChatModel
from langchain_core.load import dumpd, load
from langchain_core.messages import AIMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from logo_integrations.langchain import ChatLoGo

CONTEXT_WINDOW = 1024


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two HF folders: the tiny llama the adapters were trained on, and another one (seed 1)."""
    root = tmp_path_factory.mktemp("tiny_models")
    tokenizer = tiny.tiny_tokenizer()
    dirs = []
    for seed in (0, 1):
        folder = root / f"tiny-llama-{seed}"
        model = tiny.tiny_model(seed=seed)
        # Rotary positions: a longer window changes no weight, and lets tool prompts (the tool
        # schemas are ~600 tokens of the tiny BPE) fit.
        model.config.max_position_embeddings = CONTEXT_WINDOW
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        dirs.append(folder)
    return dirs[0], dirs[1]


def xfail(test: Callable[..., Any], reason: str) -> Callable[..., Any]:
    """An inherited standard test, marked xfail (strict) without touching the base class."""
    if inspect.iscoroutinefunction(test):

        @functools.wraps(test)
        async def run_async(*args: Any, **kwargs: Any) -> None:
            await test(*args, **kwargs)

        wrapper: Callable[..., Any] = run_async
    else:

        @functools.wraps(test)
        def run(*args: Any, **kwargs: Any) -> None:
            test(*args, **kwargs)

        wrapper = run
    return pytest.mark.xfail(reason=reason, strict=True)(wrapper)


class _TinyParams:
    """Model parameters from fixtures: the base-model folders and the trained adapter folder."""

    base: str = ""
    other: str = ""
    adapters: str = ""

    @pytest.fixture(autouse=True)
    def _folders(self, tiny_model_dirs: tuple[Path, Path], trained_dir: Path) -> None:
        cls = type(self)
        cls.base, cls.other = (str(d) for d in tiny_model_dirs)
        cls.adapters = str(trained_dir)

    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatLoGo

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": self.base, "adapters": self.adapters}


class TestChatLoGoTinyUnit(_TinyParams, ChatModelUnitTests):
    @pytest.mark.xfail(
        strict=True,
        reason="the standard test compares with a stored snapshot (these settings hold temporary "
        "folders) and loads with allowed_objects='all', which admits only langchain's own partner "
        "classes; test_serialises_and_loads_back checks the round trip with allowed_objects="
        "[ChatLoGo]",
    )
    def test_serdes(self, model: BaseChatModel, snapshot: Any) -> None:
        super().test_serdes(model, snapshot)

    def test_serialises_and_loads_back(self, model: BaseChatModel) -> None:
        serialised = dumpd(model)
        assert serialised["type"] == "constructor"
        assert serialised["kwargs"]["model"] == self.base
        assert serialised["kwargs"]["api_key"] == {
            "lc": 1,
            "type": "secret",
            "id": ["LOGO_API_KEY"],
        }  # a reference to the environment, never the value
        with mock.patch.dict(os.environ, {"LOGO_API_KEY": "test"}):
            loaded = load(
                serialised,
                valid_namespaces=["logo_integrations"],
                allowed_objects=[ChatLoGo],  # a third-party class is never in "all"
                secrets_from_env=True,
            )
        assert isinstance(loaded, ChatLoGo) and loaded.model_dump() == model.model_dump()


NO_TOOL_FOLLOWING = (
    "the tiny random model cannot follow tool prompts: its answers (free, or after the forced "
    "opening of a call) are not valid tool calls, so they arrive as invalid_tool_calls and the "
    "test finds no tool call (the plumbing is covered by the scripted-engine suite)"
)
NO_STRUCTURED = (
    "structured output goes through a forced tool call, which the tiny random model cannot "
    "complete validly (the parser gets no tool call)"
)


class TestChatLoGoTinyIntegration(_TinyParams, ChatModelIntegrationTests):
    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        # The tiny model's context window is 256 tokens: keep answers short.
        return {**super().standard_chat_model_params, "max_tokens": 12}

    @property
    def model_override_value(self) -> str | None:
        return self.other  # another base-model folder: loaded lazily on the first such call

    def test_lazy_shared_engine(self, model: ChatLoGo) -> None:
        assert model._slot.loaded is None  # constructing loads nothing
        result = model.invoke("abc abc")
        assert isinstance(result, AIMessage)
        again = ChatLoGo(**self.chat_model_params)
        assert again.engine is model.engine  # the process-wide shared engine
        assert model.engine.model_name == self.base

    # Inherited tests, xfailed with their marks (parametrisations) kept.
    test_tool_calling = xfail(ChatModelIntegrationTests.test_tool_calling, NO_TOOL_FOLLOWING)
    test_tool_calling_async = xfail(
        ChatModelIntegrationTests.test_tool_calling_async, NO_TOOL_FOLLOWING
    )
    test_bind_runnables_as_tools = xfail(
        ChatModelIntegrationTests.test_bind_runnables_as_tools, NO_TOOL_FOLLOWING
    )
    test_tool_choice = xfail(ChatModelIntegrationTests.test_tool_choice, NO_TOOL_FOLLOWING)
    test_tool_calling_with_no_arguments = xfail(
        ChatModelIntegrationTests.test_tool_calling_with_no_arguments, NO_TOOL_FOLLOWING
    )
    test_agent_loop = xfail(ChatModelIntegrationTests.test_agent_loop, NO_TOOL_FOLLOWING)
    test_unicode_tool_call_integration = xfail(
        ChatModelIntegrationTests.test_unicode_tool_call_integration, NO_TOOL_FOLLOWING
    )
    test_structured_output = xfail(ChatModelIntegrationTests.test_structured_output, NO_STRUCTURED)
    test_structured_output_async = xfail(
        ChatModelIntegrationTests.test_structured_output_async, NO_STRUCTURED
    )
    test_structured_output_pydantic_2_v1 = xfail(
        ChatModelIntegrationTests.test_structured_output_pydantic_2_v1, NO_STRUCTURED
    )
    test_structured_output_optional_param = xfail(
        ChatModelIntegrationTests.test_structured_output_optional_param, NO_STRUCTURED
    )
