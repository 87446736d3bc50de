"""Hypothesis strategies shared by the property tests: hostile text, numbers and adapter configs.

- ``unicode_text``: any code points, lone surrogates (category Cs) and control characters included.
- ``extreme_floats``: NaN, ±inf, ±0, subnormals, the largest and smallest normal floats, and any
  float.
- ``json_values``: arbitrary JSON values (nested lists and objects, any unicode, extreme numbers).
- ``adapter_configs``: a valid peft LoRA ``adapter_config.json`` with some fields replaced by
  arbitrary JSON or extreme values (the fields LoGo reads are hit more often).
"""

from __future__ import annotations

import sys
from typing import Any

from hypothesis import strategies as st

# Any code point, with lone surrogates (which no UTF-8 tokenizer can encode) over-represented.
characters = st.one_of(st.characters(exclude_categories=()), st.characters(categories=["Cs"]))
unicode_text = st.text(characters, max_size=200)

FLOAT_EDGES = [
    float("nan"),
    float("inf"),
    float("-inf"),
    0.0,
    -0.0,
    5e-324,  # smallest subnormal
    1e-45,
    sys.float_info.min,
    sys.float_info.max,
    -sys.float_info.max,
    1e39,  # overflows float32
    65505.0,  # overflows float16
    2**63,
]
extreme_floats = st.one_of(st.sampled_from(FLOAT_EDGES), st.floats())
extreme_ints = st.one_of(
    st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64, 2**70, -(2**63) - 1]), st.integers()
)

json_scalars = st.one_of(
    st.none(), st.booleans(), extreme_ints, extreme_floats, st.text(characters, max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(characters, max_size=10), children, max_size=4),
    ),
    max_leaves=12,
)


def _valid_config(r: int, alpha: float) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "base_model_name_or_path": None,
    }


READ_FIELDS = [
    "peft_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "bias",
    "use_dora",
    "fan_in_fan_out",
    "modules_to_save",
    "lora_bias",
    "base_model_name_or_path",
]
pattern_keys = st.one_of(
    st.sampled_from(["q_proj", "v_proj", "layers.0.self_attn.q_proj", "(", "[", "*", ".*"]),
    st.text(characters, max_size=8),
)
field_values = st.one_of(
    json_values,
    st.dictionaries(pattern_keys, st.one_of(extreme_ints, extreme_floats, json_values), max_size=3),
)


@st.composite
def adapter_configs(draw: st.DrawFn, r: int = 4, alpha: float = 8.0) -> dict[str, Any]:
    """A valid config for rank ``r`` with 0-3 fields replaced or deleted, plus maybe extra keys."""
    config = _valid_config(r, alpha)
    for key in draw(st.lists(st.sampled_from(READ_FIELDS), max_size=3, unique=True)):
        if draw(st.booleans()) and draw(st.booleans()):
            config.pop(key, None)
        else:
            config[key] = draw(field_values)
    config.update(draw(st.dictionaries(st.text(characters, max_size=8), json_values, max_size=2)))
    return config
