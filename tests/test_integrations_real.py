"""Both integrations on the embedded SmolLM2-135M-Instruct and the shipped zoo (``pytest -m slow``).

Structured output goes through one forced tool call: the engine writes the tool's name, the
arguments' brace and its first required parameter, and the 135M model completes the call. The
base model is pinned (``mixture={}``): the zoo's adapters were not trained on tool calls, and the
mixture routed to this question (unit_conversion first) converts the value and then copies schema
keys until the token limit, which is the adapters' behaviour, not the integrations'.
"""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # a shared CPU can be slow

QUESTION = "Convert 3 km to metres."


class Conversion(BaseModel):
    """A unit conversion."""

    value: float = Field(description="the number to convert")
    unit: str = Field(description="the unit it is in")


def test_langchain_structured_output_on_the_real_model():
    from logo_integrations import ChatLoGo

    llm = ChatLoGo(mixture={}, max_tokens=24)
    out = llm.with_structured_output(Conversion, include_raw=True).invoke(QUESTION)
    assert out["parsing_error"] is None and isinstance(out["parsed"], Conversion)
    assert out["parsed"].value == 3.0
    (call,) = out["raw"].tool_calls
    assert call["name"] == "Conversion"  # forced: the model did not have to write it
    assert out["raw"].response_metadata["logo_selection"]["pinned"]


def test_llama_index_structured_predict_on_the_real_model():
    from llama_index.core.prompts import PromptTemplate

    from logo_integrations import LoGoLLM

    llm = LoGoLLM(mixture={}, max_tokens=24)
    out = llm.structured_predict(Conversion, PromptTemplate("{question}"), question=QUESTION)
    assert isinstance(out, Conversion) and out.value == 3.0
