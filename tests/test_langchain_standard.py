"""langchain-tests standard suites for ChatLoGo over a scripted engine, with every flag on.

The script plays a model that follows tool prompts: when tools are offered it calls one, with
arguments built from the tool's JSON schema and the user's words (numbers, quoted names); after a
tool result it reports it; otherwise it greets. Everything else (routing, templates, stop strings,
tool-call parsing, streaming) is the real engine code path of ``BaseEngine``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any
from unittest import mock

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.load import dumpd, load
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from logo_engine.errors import InvalidRequestError
from logo_engine.testing import ScriptedEngine, tool_call_text
from logo_integrations.langchain import ChatLoGo

ADAPTERS = ("math", "sql", "code", "poetry")


# ------------------------------------------------------------------- a tool-following script
def example_value(schema: Mapping[str, Any], text: str, key: str, defs: Mapping[str, Any]) -> Any:
    """A plausible value for one JSON-schema node, taken from the user's text where possible."""
    if "$ref" in schema:
        return example_value(defs[schema["$ref"].split("/")[-1]], text, key, defs)
    for union in ("anyOf", "oneOf"):
        if union in schema:
            branches = [b for b in schema[union] if b.get("type") != "null"] or schema[union]
            return example_value(branches[0], text, key, defs)
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "string":
        quoted = re.search(r"'([^']+)'", text)
        return quoted.group(1) if quoted else f"a {key.replace('_', ' ')} about {text[:40]}"
    if kind in ("integer", "number"):
        numbers = re.findall(r"-?\d+", text)
        value = int(numbers[0]) if numbers else 1
        return value if kind == "integer" else float(value)
    if kind == "boolean":
        return True
    if kind == "array":
        return [example_value(schema.get("items", {"type": "string"}), text, key, defs)]
    if kind == "object" or "properties" in schema:
        return example_arguments(schema, text, defs)
    return f"{key}"


def example_arguments(
    schema: Mapping[str, Any], text: str, defs: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Arguments for a tool, one plausible value per property of its parameter schema."""
    defs = {**(defs or {}), **schema.get("$defs", {}), **schema.get("definitions", {})}
    return {
        key: example_value(prop, text, key, defs)
        for key, prop in schema.get("properties", {}).items()
    }


def pick_tool(tools: Sequence[Mapping[str, Any]], text: str) -> Mapping[str, Any]:
    """The tool named in the user's text, else the first one."""
    functions = [t.get("function", t) for t in tools]
    for function in functions:
        if function["name"] in text:
            return function
    return functions[0]


def standard_script(messages: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]]) -> str:
    """A model that follows tool prompts: call a tool, report its result, or chat."""
    last = messages[-1]
    user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    if last["role"] == "tool":
        return f"The tool returned {last['content']}."
    if tools:
        function = pick_tool(tools, user)
        return tool_call_text(
            function["name"], example_arguments(function.get("parameters", {}), user)
        )
    return f"Hello! You said: {user} Here is a short answer for you."


def scripted_engine() -> ScriptedEngine:
    return ScriptedEngine(standard_script, adapter_names=ADAPTERS)


# ---------------------------------------------------------------------------- the suites
class TestChatLoGoScriptedUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatLoGo

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"engine": scripted_engine()}

    @pytest.mark.xfail(
        strict=True,
        reason="an engine passed in is a live object, so a ChatLoGo built over one serialises as "
        "'not_implemented' and does not load back (one built from settings does: "
        "test_langchain.py::test_settings_serialise_and_load_back)",
    )
    def test_serdes(self, model: BaseChatModel, snapshot: Any) -> None:
        assert dumpd(model)["type"] == "not_implemented"
        super().test_serdes(model, snapshot)


OVERRIDE_REASON = (
    "a ChatLoGo built over an engine instance serves only that engine's model, so a per-call "
    "model= naming another base model is refused (InvalidRequestError); the override is exercised "
    "for real in test_langchain_tiny.py, where ChatLoGo loads its engines itself"
)


class TestChatLoGoScriptedIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatLoGo

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"engine": scripted_engine()}

    @property
    def supports_json_mode(self) -> bool:
        # with_structured_output(method="json_mode") goes through tool calling, like every method.
        return True

    @property
    def model_override_value(self) -> str | None:
        return "another-base-model"

    @pytest.mark.xfail(reason=OVERRIDE_REASON, raises=InvalidRequestError, strict=True)
    def test_invoke_with_model_override(self, model: BaseChatModel) -> None:
        super().test_invoke_with_model_override(model)

    @pytest.mark.xfail(reason=OVERRIDE_REASON, raises=InvalidRequestError, strict=True)
    async def test_ainvoke_with_model_override(self, model: BaseChatModel) -> None:
        await super().test_ainvoke_with_model_override(model)

    @pytest.mark.xfail(reason=OVERRIDE_REASON, raises=InvalidRequestError, strict=True)
    def test_stream_with_model_override(self, model: BaseChatModel) -> None:
        super().test_stream_with_model_override(model)

    @pytest.mark.xfail(reason=OVERRIDE_REASON, raises=InvalidRequestError, strict=True)
    async def test_astream_with_model_override(self, model: BaseChatModel) -> None:
        await super().test_astream_with_model_override(model)


# ------------------------------------------------------------------- the suites, remote
# The same suites with ChatLoGo(base_url=...): every call crosses HTTP to `logo serve` through
# RemoteEngine. The model then holds settings only (no engine object), so it serialises and loads
# back, and a per-call model= names a served model: the in-process xfails have no counterpart.
REMOTE_URL = "http://127.0.0.1:8000/v1"  # the unit suite never calls the server


class TestChatLoGoRemoteUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatLoGo

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"base_url": REMOTE_URL, "api_key": "test-key"}

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        return {"LOGO_API_KEY": "env-key"}, {"base_url": REMOTE_URL}, {"api_key": "env-key"}

    @pytest.mark.xfail(
        strict=True,
        raises=ValueError,
        reason="the suite loads back with allowed_objects='all', which in langchain-core 1.x "
        "admits only the classes listed in langchain_core.load.mapping (no third-party class "
        "passes); the dump is checked against the snapshot first, and the load back with "
        "ChatLoGo allowed is test_serdes_with_the_class_allowed below",
    )
    def test_serdes(self, model: BaseChatModel, snapshot: Any) -> None:
        super().test_serdes(model, snapshot)

    def test_serdes_with_the_class_allowed(self, model: BaseChatModel) -> None:
        with mock.patch.dict(os.environ, {"LOGO_API_KEY": "test-key"}):
            loaded = load(
                dumpd(model),
                valid_namespaces=["logo_integrations"],
                allowed_objects=[ChatLoGo],
                secrets_from_env=True,
            )
        assert isinstance(loaded, ChatLoGo) and loaded.model_dump() == model.model_dump()
        assert loaded.base_url == REMOTE_URL
        assert loaded.api_key is not None and loaded.api_key.get_secret_value() == "test-key"


@pytest.fixture(scope="module")
def served_url() -> Any:
    """The scripted engine behind a live `logo serve` app on 127.0.0.1 (a free port)."""
    from logo_engine.serving.server import BackgroundServer

    with BackgroundServer(scripted_engine()) as server:
        yield server.base_url


@pytest.mark.enable_socket
@pytest.mark.allow_hosts(["127.0.0.1"])
class TestChatLoGoRemoteIntegration(ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _url(self, served_url: str) -> None:
        self.url = served_url

    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatLoGo

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"base_url": self.url, "api_key": "unused"}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str | None:
        return "scripted-model:sql"  # the served model with one adapter pinned: a real override
