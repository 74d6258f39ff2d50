"""The batcher on its own (no HTTP): grouping, per-row limits, streaming deltas, cancellation, failures."""

from __future__ import annotations

import argparse
import asyncio

import pytest
import torch

from minillava.generate import GenerationConfig, Generator, hold_back
from minillava.model import MiniLlava
from minillava.serve import batching
from minillava.serve.batching import BatchEngine, Job
from minillava.serve.cli import add_commands, main


@pytest.fixture(scope="module")
def gen(serve_dir, one_thread):
    return Generator(*MiniLlava.from_pretrained(serve_dir))


def run_jobs(engine: BatchEngine, jobs: list[Job], cancel: tuple[int, ...] = ()) -> list[tuple[list[str], object]]:
    """Queue every job before the worker starts, so batching is deterministic; collect their events."""

    async def go():
        for job in jobs:
            engine.submit(job)
        for i in cancel:
            jobs[i].cancel()
        engine.start()
        out = []
        for i, job in enumerate(jobs):
            if i in cancel:
                out.append(([], None))
                continue
            deltas, last = [], None
            async for kind, value in job.events():
                if kind == "delta":
                    deltas.append(value)
                else:
                    last = (kind, value)
            out.append((deltas, last))
        engine.stop()
        return out

    return asyncio.run(go())


def test_one_batch_with_per_row_limits_equals_one_at_a_time(gen):
    specs = [("hello", 5, []), ("yes no one two", 9, []), ("The capital of France is", 12, []),
             ("a red square", 7, []), ("What is in the picture?", 10, [])]  # fmt: skip
    want = [gen.generate(p, None, GenerationConfig(max_new_tokens=n)) for p, n, _ in specs]
    specs[2] = (specs[2][0], 12, [want[2][3:5]])  # a stop string inside one row's answer
    want[2] = gen.generate(specs[2][0], None, GenerationConfig(max_new_tokens=12, stop=specs[2][2]))
    engine = BatchEngine(gen, max_batch_size=8, batch_wait_s=0)
    jobs = [Job(gen.encode(p, None), max_tokens=n, stop=s, stream=i % 2 == 0) for i, (p, n, s) in enumerate(specs)]
    results = run_jobs(engine, jobs)
    assert engine.stats["batches"] == 1 and engine.stats["max_batch"] == len(jobs)
    for (deltas, (kind, fin)), job, text in zip(results, jobs, want, strict=True):
        assert kind == "done" and fin.text == text
        assert fin.prompt_tokens == len(job.encoded.input_ids) and 1 <= fin.completion_tokens <= job.max_tokens
        if job.stream:
            assert "".join(deltas) == text
        else:
            assert deltas == []
    assert results[2][1][1].finish_reason == "stop"


def test_sampling_settings_split_batches_and_seeds_run_alone(gen):
    engine = BatchEngine(gen, max_batch_size=8, batch_wait_s=0)
    enc = gen.encode("hello", None)
    jobs = [Job(enc, 4), Job(enc, 4, temperature=0.7), Job(enc, 4), Job(enc, 4, temperature=0.7),
            Job(enc, 4, temperature=0.7, seed=1), Job(enc, 4, temperature=0.7, seed=1)]  # fmt: skip
    results = run_jobs(engine, jobs)
    assert [r[1][0] for r in results] == ["done"] * 6
    assert engine.stats["batches"] == 4  # greedy pair, unseeded sampled pair, each seeded one alone
    assert results[4][1][1].text == results[5][1][1].text  # same seed, same batch shape: same answer


def test_cancelled_jobs_are_dropped_and_a_failing_batch_does_not_stop_the_worker(gen):
    engine = BatchEngine(gen, max_batch_size=1, batch_wait_s=0)
    good = gen.encode("hello", None)
    broken = gen.encode("hello", None)
    broken.input_ids = broken.input_ids + [gen.processor.image_token_id] * 3  # image slots with no image
    jobs = [Job(good, 3), Job(broken, 3), Job(good, 3)]
    results = run_jobs(engine, [Job(good, 50), *jobs], cancel=(0,))
    assert engine.stats["cancelled"] == 1
    kinds = [r[1][0] if r[1] else None for r in results]
    assert kinds == [None, "done", "error", "done"]
    assert "generation failed" in results[2][1][1]


def test_queue_limit():
    class Stub:
        processor = None
        stop_ids = [0]

    engine = BatchEngine(Stub(), max_queue=1)  # type: ignore[arg-type]

    async def go():
        engine.submit(Job(None, 1))  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match="waiting"):
            engine.submit(Job(None, 1))  # type: ignore[arg-type]

    asyncio.run(go())


def test_streamed_answer_with_overlapping_stops_equals_the_whole_answer(gen, monkeypatch):
    """The server streams through the generator's stop logic: stops ["ab", "xab"] on "hello xab!" cut the
    answer to "hello ", and the deltas must never have sent the "x" (forced tokens, one per character)."""
    tok = gen.processor.tokenizer
    forced = [i for c in "hello xab!" for i in tok(c, add_special_tokens=False).input_ids]

    def fake_decode(model, batch, cfg, stop_ids, pad_id, static_cache=None):
        for t in forced[: cfg.max_new_tokens]:
            yield torch.tensor([t]), torch.zeros(1, dtype=torch.bool)

    monkeypatch.setattr(batching, "decode", fake_decode)
    engine = BatchEngine(gen, max_batch_size=1, batch_wait_s=0)
    jobs = [Job(gen.encode("hi", None), max_tokens=16, stop=["ab", "xab"], stream=s) for s in (True, False)]
    (deltas, (kind, fin)), (_, (_, whole)) = run_jobs(engine, jobs)
    assert kind == "done" and fin.text == whole.text == "hello " and fin.finish_reason == "stop"
    assert "".join(deltas) == "hello ", deltas


def test_hold_back():
    assert hold_back("abc</", ["</s>"]) == "abc"
    assert hold_back("abc\ufffd", []) == "abc"
    assert hold_back("abc", ["xyz"]) == "abc"
    assert hold_back("hello xa", ["ab", "xab"]) == "hello "  # the longest tail that starts a stop


def test_cli_registers_serve(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="minillava")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", str(tmp_path), "--max-batch-size", "3", "--api-key", "k"])
    assert callable(args.func) and args.max_batch_size == 3 and args.api_key == "k" and args.port == 8000
    assert args.host == "127.0.0.1" and not args.allow_remote_images
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--model", str(tmp_path), "--max-batch-size", "0"])
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_a_finished_batch_keeps_no_pixels_and_returns_memory(gen, monkeypatch):
    from PIL import Image

    calls = []
    monkeypatch.setattr(batching, "release_memory", lambda: calls.append(1))
    engine = BatchEngine(gen, max_batch_size=2, batch_wait_s=0)
    image = Image.new("RGB", (32, 32), (10, 200, 30))
    jobs = [Job(gen.encode("what is it?", [image]), 3), Job(gen.encode("hello", None), 3)]
    results = run_jobs(engine, jobs)
    assert [r[1][0] for r in results] == ["done", "done"]
    assert all(job.encoded.pixel_values is None for job in jobs) and calls == [1]
    assert results[0][1][1].prompt_tokens == len(jobs[0].encoded.input_ids) > 16  # the image tokens still count


def test_cli_limits_flags(tmp_path):
    parser = argparse.ArgumentParser(prog="minillava")
    add_commands(parser.add_subparsers(dest="command"))
    base = ["serve", "--model", str(tmp_path)]
    args = parser.parse_args(base)
    assert args.allowed_origins == () and args.shutdown_timeout == 30.0 and args.max_text_chars is None
    args = parser.parse_args([*base, "--allowed-origins", "https://a.example, http://b.example:8080/",
                              "--shutdown-timeout", "2.5", "--max-text-chars", "1000"])  # fmt: skip
    assert args.allowed_origins == ("https://a.example", "http://b.example:8080")
    assert args.shutdown_timeout == 2.5 and args.max_text_chars == 1000
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--allowed-origins", "a.example"])
