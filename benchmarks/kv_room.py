"""Decoding steps with the KV in buffers with room (``RoomyLayer``) against transformers' plain
``DynamicLayer``, which concatenates the whole cache at every step.

Step-interleaved A/B on the embedded default model: a batch of ``--rows`` open questions, each
after a system prompt of about ``--prompt-tokens`` tokens, is prefilled once; then two copies of
its cache (one plain, one with room) decode the same greedy tokens side by side, alternating
which goes first at every step, so both see the same machine load at the same cache length. The
decoder's own forward and left-padded batch are used; the adapters are off (the mixture does
not touch the cache). Reported: the median step of each, their ratio, and the ratio per quarter
of the steps (the plain cache copies more as it grows). The logits of both must be equal.

    HF_HUB_OFFLINE=1 python -m benchmarks.kv_room --rows 8 --prompt-tokens 800 --max-tokens 64
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from transformers import DynamicCache

from benchmarks.serving import open_prompts
from logo_engine import LoGoEngine, decoding
from logo_engine.decoding import left_pad, positions
from logo_engine.mixture import ForwardContext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=800, help="system prompt, about")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    engine = LoGoEngine.from_pretrained()
    decoder = engine._decoder
    sentence = "The library keeps adapters for code, SQL, maths and translation. "  # 12 tokens
    system = sentence * (args.prompt_tokens // 12)
    chats = [
        [{"role": "system", "content": system}, *p] if system else p
        for p in open_prompts(args.rows)
    ]
    tokenizer = engine.tokenizer
    ids = [
        tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"]
        for chat in chats
    ]
    ctx = ForwardContext()
    input_ids, mask = left_pad(engine.tokenizer, ids, decoder.device)
    pos = positions(mask)
    plain = DynamicCache(config=engine.model.config)
    logits = decoder.forward(ctx, input_ids, mask, pos, plain)
    roomy = copy.deepcopy(plain)
    times: dict[str, list[float]] = {"plain": [], "room": []}
    equal = True
    for step in range(args.max_tokens):
        tokens = logits.argmax(-1)[:, None]  # (B, 1)
        mask = torch.cat([mask, mask.new_ones(len(ids), 1)], dim=1)
        pos = pos[:, -1:] + 1
        decoding.make_room(roomy, args.max_tokens - step + 1)
        out = {}
        order = ("plain", "room") if step % 2 == 0 else ("room", "plain")
        for name in order:
            cache = plain if name == "plain" else roomy
            start = time.perf_counter()
            out[name] = decoder.forward(ctx, tokens, mask, pos, cache)
            times[name].append(time.perf_counter() - start)
        equal = equal and torch.equal(out["plain"], out["room"])
        logits = out["plain"]
    n = len(times["plain"])
    quarters = [
        statistics.median(times["room"][i : i + n // 4])
        / statistics.median(times["plain"][i : i + n // 4])
        for i in range(0, n - n // 4 + 1, max(1, n // 4))
    ]
    plain_ms, room_ms = (statistics.median(times[k]) * 1000 for k in ("plain", "room"))
    print(
        f"{platform.machine()} {torch.get_num_threads()} torch threads, {engine.model_name}; "
        f"{args.rows} rows, prompts up to {input_ids.shape[1]} tokens, {n} steps"
    )
    print(
        f"median step: plain {plain_ms:.1f} ms, room {room_ms:.1f} ms, room/plain "
        f"{room_ms / plain_ms:.3f}"
    )
    print(f"room/plain by quarter of the steps: {[round(q, 3) for q in quarters]}")
    print(f"equal logits at every step: {equal}")


if __name__ == "__main__":
    main()
