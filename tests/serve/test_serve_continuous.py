"""Continuous (iteration-level) batching: requests join a running batch and leave it when done, and every
greedy answer still equals the answer alone (float32)."""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest
from PIL import Image

from minillava.generate import GenerationConfig, Generator
from minillava.model import MiniLlava
from minillava.serve.batching import ContinuousEngine, Job


@pytest.fixture(scope="module")
def gen(serve_dir, one_thread):
    return Generator(*MiniLlava.from_pretrained(serve_dir))


async def collect(job: Job, log: list[str]) -> tuple[str, object]:
    deltas = []
    async for kind, value in job.events():
        if kind == "delta":
            deltas.append(value)
        else:
            log.append(job.name)
            return kind, value
    raise AssertionError("no end event")


@pytest.mark.parametrize("prefill_chunk", [0, 3])  # 3: every prompt is prefilled in several chunks
def test_late_arrivals_join_the_running_batch_and_match_one_at_a_time(gen, prefill_chunk):
    red, blue = Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (24, 48), (20, 40, 220))
    specs = [  # name, prompt, images, max_tokens, stop
        ("long", "hello", [], 200, []), ("img", "What is in the picture?", [red], 9, []),
        ("short", "yes no one two", [], 4, []), ("two", "hello world", [red, blue], 12, []),
        ("late", "The capital of France is", [], 10, []),
    ]  # fmt: skip
    want = {n: gen.generate(p, i, GenerationConfig(max_new_tokens=m, stop=s)) for n, p, i, m, s in specs}
    engine = ContinuousEngine(gen, max_batch_size=4, batch_wait_s=0, prefill_chunk=prefill_chunk)
    assert ContinuousEngine.supports(gen)

    def job(name: str) -> Job:
        _, p, i, m, s = next(x for x in specs if x[0] == name)
        j = Job(gen.encode(p, i), max_tokens=m, stop=s, stream=name in ("long", "two"))
        j.name = name  # type: ignore[attr-defined]
        return j

    async def go():
        engine.start()
        order: list[str] = []
        first = engine.submit(job("long"))
        results = {"long": asyncio.ensure_future(collect(first, order))}
        await asyncio.sleep(0)  # the long one starts alone ...
        while engine.running == 0:
            await asyncio.sleep(0.005)
        for name in ("img", "short", "two"):  # ... and the others arrive while it decodes, one by one
            results[name] = asyncio.ensure_future(collect(engine.submit(job(name)), order))
            await asyncio.sleep(0.02)
        await results["short"]
        results["late"] = asyncio.ensure_future(collect(engine.submit(job("late")), order))
        out = {n: await f for n, f in results.items()}
        engine.stop()
        return out, order

    out, order = asyncio.run(go())
    for name, (kind, fin) in out.items():
        assert kind == "done" and fin.text == want[name], (name, fin, want[name])
    assert engine.stats["max_batch"] >= 2, engine.stats  # they really shared decode steps
    # the short one joined the long one and left first (200 tokens outlast the 60 ms the others take to arrive;
    # "late" arrives after "short" ends: it may end either side of "long")
    assert order.index("short") < order.index("long") or out["long"][1].finish_reason == "stop"


def test_cancel_and_seeded_rows(gen):
    engine = ContinuousEngine(gen, max_batch_size=4, batch_wait_s=0.05)
    enc = gen.encode("hello", None)

    async def go():
        jobs = [Job(enc, 40), Job(enc, 8, temperature=0.8, seed=3), Job(enc, 8, temperature=0.8, seed=3)]
        for j in jobs:
            engine.submit(j)
        engine.start()
        jobs[0].cancel()
        ends = []
        for j in jobs[1:]:
            async for kind, value in j.events():
                if kind != "delta":
                    ends.append((kind, value))
        while engine.running:
            await asyncio.sleep(0.01)
        engine.stop()
        return ends

    (k1, a), (k2, b) = asyncio.run(go())
    assert k1 == k2 == "done" and a.text == b.text  # same seed, own generator: the same answer in one batch
    assert engine.stats["cancelled"] == 1


def test_a_failing_prompt_fails_alone(gen):
    engine = ContinuousEngine(gen, max_batch_size=4, batch_wait_s=0.05)
    good = gen.encode("hello", None)
    broken = gen.encode("hello", None)
    broken.input_ids = broken.input_ids + [gen.processor.image_token_id] * 3  # image slots with no image
    want = gen.generate("hello", None, GenerationConfig(max_new_tokens=6))

    async def go():
        jobs = [Job(good, 6), Job(broken, 6), Job(good, 6)]
        for j in jobs:
            engine.submit(j)
        engine.start()
        ends = []
        for j in jobs:
            async for kind, value in j.events():
                if kind != "delta":
                    ends.append((kind, value))
        engine.stop()
        return ends

    ends = asyncio.run(go())
    assert [k for k, _ in ends] == ["done", "error", "done"] and "generation failed" in ends[1][1]
    assert ends[0][1].text == ends[2][1].text == want and engine.stats["errors"] == 1


def test_a_long_prompt_is_prefilled_in_chunks_between_the_batchs_decode_steps(gen, monkeypatch):
    """A newcomer's 60-token prompt, chunks of 8: the running row decodes a token between every two chunks
    (without chunks it would wait for the whole prefill), and both answers equal the answers alone."""
    long_prompt = " ".join(["one two three"] * 20)
    want = {"run": gen.generate("hello", None, GenerationConfig(max_new_tokens=60)),
            "new": gen.generate(long_prompt, None, GenerationConfig(max_new_tokens=5))}  # fmt: skip
    engine = ContinuousEngine(gen, max_batch_size=4, batch_wait_s=0, prefill_chunk=8)
    calls: list[tuple[str, int]] = []
    fill, step = engine._fill, engine._step
    monkeypatch.setattr(engine, "_fill", lambda f: calls.append(("fill", len(f.jobs))) or fill(f))
    monkeypatch.setattr(engine, "_step", lambda r: calls.append(("step", len(r.rows))) or step(r))

    async def go():
        engine.start()
        running = engine.submit(Job(gen.encode("hello", None), 60))
        while engine.running == 0:
            await asyncio.sleep(0.002)
        newcomer = engine.submit(Job(gen.encode(long_prompt, None), 5))
        running.name, newcomer.name = "run", "new"  # type: ignore[attr-defined]
        out = [await collect(j, []) for j in (running, newcomer)]
        engine.stop()
        return out

    (k1, run), (k2, new) = asyncio.run(go())
    assert k1 == k2 == "done" and run.text == want["run"] and new.text == want["new"]
    chunks = [i for i, c in enumerate(calls) if c == ("fill", 1)]
    needed = math.ceil(len(gen.encode(long_prompt, None).input_ids) / 8)
    assert needed >= 7 and len(chunks) >= needed  # the newcomer's prefill, chunk by chunk (then the first's)
    for a, b in itertools.pairwise(chunks[-needed:]):
        assert ("step", 1) in calls[a:b], calls  # the running row decoded between the two chunks
