"""A fake ``vllm`` package for tests of the vLLM backend without vLLM.

It has the parts of vLLM's API the backend uses (``LLM``, ``SamplingParams``,
``lora.request.LoRARequest``, ``inputs.tokens_input``, ``LLM.llm_engine``'s ``add_request``,
``step``, ``abort_request``, ``add_lora``, ``remove_lora``, ``has_unfinished_requests``,
``vllm_config.lora_config``), records every call, and really generates: each LoRA is loaded
from its folder with **peft** onto a fresh ``tiny.tiny_model()``, one token per request per
step (full recompute, no KV cache), with vLLM's scheduling rule that a step runs at most
``max_loras`` distinct adapters and its ``max_lora_rank`` check. So the backend's output can be
compared with the engine's own (an independent path: peft's layers, not the engine's hooks).
"""

from __future__ import annotations

import json
import sys
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import tiny
import torch
from peft import PeftModel


class SamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        for k, v in kwargs.items():
            setattr(self, k, v)


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError(f"id must be > 0, got {self.lora_int_id}")


def tokens_input(prompt_token_ids: list[int]) -> dict[str, Any]:
    return {"type": "token", "prompt_token_ids": prompt_token_ids}


@dataclass
class _Completion:
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class _Output:
    request_id: str
    outputs: list[_Completion]
    finished: bool


@dataclass
class _Req:
    rid: str
    prompt: list[int]
    params: SamplingParams
    lora: LoRARequest | None
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    reason: str | None = None
    generator: torch.Generator | None = None


class FakeEngine:
    def __init__(self, max_lora_rank: int = 64, max_loras: int = 2, lora: bool = True) -> None:
        self.calls: list[tuple[str, Any]] = []
        lora_config = types.SimpleNamespace(max_lora_rank=max_lora_rank, max_loras=max_loras)
        self.vllm_config = types.SimpleNamespace(lora_config=lora_config if lora else None)
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.loaded: dict[int, PeftModel] = {}
        self.requests: dict[str, _Req] = {}
        self.base = tiny.tiny_model()
        self.steps = 0

    # LoRA management
    def add_lora(self, request: LoRARequest) -> bool:
        self.calls.append(("add_lora", request))
        self._load(request)
        return True

    def remove_lora(self, lora_id: int) -> bool:
        self.calls.append(("remove_lora", lora_id))
        return self.loaded.pop(lora_id, None) is not None

    def _load(self, request: LoRARequest) -> PeftModel:
        model = self.loaded.get(request.lora_int_id)
        if model is None:
            path = Path(request.lora_path)
            config = json.loads((path / "adapter_config.json").read_text())
            rank = max([config["r"], *(config.get("rank_pattern") or {}).values()])
            if rank > self.max_lora_rank:  # vLLM's PEFTHelper.validate_legal
                raise ValueError(
                    f"LoRA rank {rank} is greater than max_lora_rank {self.max_lora_rank}."
                )
            model = PeftModel.from_pretrained(tiny.tiny_model(), path).eval()
            self.loaded[request.lora_int_id] = model
        return model

    # requests
    def add_request(
        self, request_id: str, prompt: Any, params: SamplingParams, lora_request: Any = None
    ) -> str:
        self.calls.append(("add_request", (request_id, prompt, params, lora_request)))
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id}")
        gen = None
        if params.temperature > 0:
            gen = torch.Generator().manual_seed(params.seed if params.seed is not None else 0)
        self.requests[request_id] = _Req(
            request_id, list(prompt["prompt_token_ids"]), params, lora_request, generator=gen
        )
        return request_id

    def abort_request(self, request_ids: list[str], internal: bool = False) -> None:
        self.calls.append(("abort_request", list(request_ids)))
        for rid in request_ids:
            self.requests.pop(rid, None)

    def has_unfinished_requests(self) -> bool:
        return any(not r.finished for r in self.requests.values())

    def step(self) -> list[_Output]:
        self.steps += 1
        running: list[_Req] = []
        loras: set[int] = set()
        for req in self.requests.values():
            if req.finished:
                continue
            lid = req.lora.lora_int_id if req.lora is not None else None
            if lid is not None and lid not in loras and len(loras) >= self.max_loras:
                continue  # vLLM runs at most max_loras distinct adapters per step
            if lid is not None:
                loras.add(lid)
            running.append(req)
        outputs = []
        for req in running:
            model = self._load(req.lora) if req.lora is not None else self.base
            ids = torch.tensor([req.prompt + req.tokens])
            with torch.inference_mode():
                logits = model(input_ids=ids).logits[0, -1].float()
            if req.generator is None:
                token = int(logits.argmax())
            else:
                probs = torch.softmax(logits / req.params.temperature, -1)
                token = int(torch.multinomial(probs, 1, generator=req.generator)[0])
            req.tokens.append(token)
            if token in (req.params.stop_token_ids or []):
                req.finished, req.reason = True, "stop"
            elif len(req.tokens) >= req.params.max_tokens:
                req.finished, req.reason = True, "length"
            outputs.append(
                _Output(req.rid, [_Completion(list(req.tokens), req.reason)], req.finished)
            )
        for req in running:
            if req.finished:
                del self.requests[req.rid]
        return outputs

    def names(self, method: str) -> list[Any]:
        return [args for name, args in self.calls if name == method]


class LLM:
    """``vllm.LLM``: records its keyword arguments; ``llm_engine`` is a :class:`FakeEngine`."""

    instances: ClassVar[list[LLM]] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.llm_engine = FakeEngine(
            max_lora_rank=kwargs.get("max_lora_rank", 16),
            max_loras=kwargs.get("max_loras", 1),
            lora=kwargs.get("enable_lora", False),
        )
        LLM.instances.append(self)


def install(monkeypatch: Any) -> types.ModuleType:
    """Put the fake ``vllm`` (and its submodules) in ``sys.modules`` for one test."""
    vllm = types.ModuleType("vllm")
    vllm.LLM = LLM  # type: ignore[attr-defined]
    vllm.SamplingParams = SamplingParams  # type: ignore[attr-defined]
    inputs = types.ModuleType("vllm.inputs")
    inputs.tokens_input = tokens_input  # type: ignore[attr-defined]
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest  # type: ignore[attr-defined]
    vllm.inputs, vllm.lora, lora.request = inputs, lora, request  # type: ignore[attr-defined]
    for name, module in {
        "vllm": vllm,
        "vllm.inputs": inputs,
        "vllm.lora": lora,
        "vllm.lora.request": request,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    LLM.instances = []
    return vllm


class FakeServer:
    """A vLLM OpenAI server for ``httpx.MockTransport``: runtime LoRA loading, streamed
    ``/v1/completions`` with token ids, generated by a :class:`FakeEngine` (peft)."""

    BASE = "tiny-base"

    def __init__(self, max_lora_rank: int = 64) -> None:
        self.engine = FakeEngine(max_lora_rank=max_lora_rank, max_loras=4)
        self.loras: dict[str, LoRARequest] = {}
        self.calls: list[tuple[str, Any]] = []
        self._ids = 0
        self._lock = threading.Lock()
        self._latest: dict[str, _Output] = {}  # request id -> newest cumulative output

    def handler(self, request: Any) -> Any:
        import httpx

        path = request.url.path
        body = json.loads(request.content) if request.content else None
        self.calls.append((path, body))
        if path == "/v1/models":
            data = [{"id": self.BASE, "parent": None}]
            data += [{"id": name, "parent": self.BASE} for name in self.loras]
            return httpx.Response(200, json={"object": "list", "data": data})
        if path == "/v1/load_lora_adapter":
            name = body["lora_name"]
            if name in self.loras:
                return httpx.Response(
                    400,
                    json={
                        "error": {"message": f"The lora adapter '{name}' has already been loaded."}
                    },
                )
            self._ids += 1
            lora = LoRARequest(name, self._ids, body["lora_path"])
            try:
                self.engine._load(lora)
            except ValueError as exc:
                return httpx.Response(400, json={"error": {"message": str(exc)}})
            self.loras[name] = lora
            return httpx.Response(200, text=f"Success: LoRA adapter '{name}' added successfully.")
        if path == "/v1/unload_lora_adapter":
            lora = self.loras.pop(body["lora_name"], None)
            if lora is None:
                return httpx.Response(404, json={"error": {"message": "not found"}})
            self.engine.loaded.pop(lora.lora_int_id, None)
            return httpx.Response(200, text="Success")
        if path == "/v1/completions":
            model = body["model"]
            if model != self.BASE and model not in self.loras:
                return httpx.Response(404, json={"error": {"message": f"model {model} not found"}})
            params = SamplingParams(
                max_tokens=body["max_tokens"],
                temperature=body["temperature"],
                seed=body.get("seed"),
                stop_token_ids=body.get("stop_token_ids"),
            )
            rid = f"srv-{len(self.calls)}"
            self.engine.add_request(
                rid, {"prompt_token_ids": body["prompt"]}, params, self.loras.get(model)
            )
            return httpx.Response(
                200, headers={"content-type": "text/event-stream"}, content=self._sse(rid)
            )
        return httpx.Response(404, json={"error": {"message": f"no route {path}"}})

    def _sse(self, rid: str) -> Any:
        """One request's stream; streams read in other threads step the same engine."""
        sent = 0
        while True:
            with self._lock:
                out = self._latest.pop(rid, None)
                if out is None:
                    for o in self.engine.step():
                        self._latest[o.request_id] = o
                    out = self._latest.pop(rid, None)
            if out is None:
                continue
            tokens = out.outputs[0].token_ids[sent:]
            sent += len(tokens)
            choice = {
                "index": 0,
                "text": "",
                "token_ids": tokens,
                "finish_reason": out.outputs[0].finish_reason if out.finished else None,
            }
            yield f"data: {json.dumps({'choices': [choice]})}\n\n".encode()
            if out.finished:
                yield b"data: [DONE]\n\n"
                return

    def bodies(self, path: str) -> list[Any]:
        return [body for p, body in self.calls if p == path]
