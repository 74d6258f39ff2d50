"""The lmms-eval adapter's methods on a tiny model, driven by a small local task file (no lmms-eval needed)."""

from __future__ import annotations

import importlib
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from minillava.generate import GenerationConfig, Generator
from minillava.processor import IGNORE_INDEX

TASK, SPLIT = "local_colours", "test"


@dataclass
class Instance:
    """What the adapter reads of lmms-eval's Instance: `args`."""

    args: tuple


@pytest.fixture(scope="module")
def task_docs(image_dir: Path, tmp_path_factory) -> list[dict]:
    """A small local task file: JSONL docs with an image path, a question and a target."""
    rows = [
        {"image": "red.png", "question": "What colour is the picture?", "target": "red"},
        {"image": "blue.png", "question": "Is there a square?", "target": "yes"},
        {"image": "green.png", "question": "Describe the image in detail, please.", "target": "a green square"},
        {"image": None, "question": "What is the capital of France?", "target": "Paris"},
    ]
    path = tmp_path_factory.mktemp("task") / "local_colours.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [{**json.loads(line), "root": str(image_dir)} for line in path.read_text().splitlines()]


def doc_to_visual(doc: dict) -> list:
    return [Image.open(Path(doc["root"]) / doc["image"]).convert("RGB")] if doc["image"] else []


def doc_to_target(doc: dict) -> str:
    return " " + doc["target"]


@pytest.fixture
def adapter(eval_model, task_docs):
    from minillava.eval.lmms_adapter import MiniLlavaLMMS

    model, processor = eval_model
    lm = MiniLlavaLMMS(model=model, processor=processor, batch_size=3, max_new_tokens=5)
    lm.task_dict = {TASK: {SPLIT: task_docs}}
    return lm


def gen_request(doc_id: int, docs: list[dict], **gen_kwargs) -> Instance:
    return Instance((docs[doc_id]["question"], dict(gen_kwargs), doc_to_visual, doc_id, TASK, SPLIT))


def ll_request(doc_id: int, docs: list[dict], target=doc_to_target) -> Instance:
    return Instance((docs[doc_id]["question"], target, doc_to_visual, doc_id, TASK, SPLIT))


def test_generate_until_matches_the_generator(adapter, eval_model, task_docs):
    model, processor = eval_model
    generator = Generator(model, processor)
    requests = [gen_request(i, task_docs, max_new_tokens=4) for i in range(len(task_docs))]
    requests.append(gen_request(0, task_docs, max_new_tokens=2, until=["\n\n"]))  # a second gen_kwargs group
    out = adapter.generate_until(requests)
    assert len(out) == len(requests)
    for i, doc in enumerate(task_docs):
        alone = generator.generate(doc["question"], doc_to_visual(doc), GenerationConfig(max_new_tokens=4))
        assert out[i] == alone  # batched (3 per batch, left padded) == one at a time
    assert out[-1] == generator.generate(
        task_docs[0]["question"], doc_to_visual(task_docs[0]), GenerationConfig(max_new_tokens=2, stop=["\n\n"])
    )


def test_generate_until_cuts_at_until(adapter, task_docs):
    full = adapter.generate_until([gen_request(2, task_docs, max_new_tokens=5)])[0]
    if len(full) < 2:
        pytest.skip("the tiny model's answer is too short to cut")
    stop = full[1:3]
    cut = adapter.generate_until([gen_request(2, task_docs, max_new_tokens=5, until=stop)])[0]
    assert cut == full[: full.find(stop)]


def reference_loglikelihood(model, processor, context: str, images: list, continuation: str) -> tuple[float, bool]:
    """One unpadded sequence through the model's own loss path: labels on the continuation only."""
    enc = processor.prompt(context, images)
    cont = processor.tokenizer(continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([enc.input_ids + cont])
    labels = torch.tensor([[IGNORE_INDEX] * len(enc.input_ids) + cont])
    with torch.no_grad():
        out = model(ids, pixel_values=enc.pixel_values, labels=labels)
    logits = out.logits[0, len(enc.input_ids) - 1 : -1].float()
    logits[:, model.config.image_token_id] = -float("inf")
    greedy = bool((logits.argmax(-1) == torch.tensor(cont)).all())
    return -float(out.loss) * len(cont), greedy  # mean loss over the continuation's tokens -> summed log-prob


def test_loglikelihood_is_the_summed_log_prob_of_the_continuation(adapter, eval_model, task_docs):
    model, processor = eval_model
    requests = [ll_request(i, task_docs) for i in range(len(task_docs))]
    requests.append(ll_request(1, task_docs, target=" no"))  # a literal target string
    got = adapter.loglikelihood(requests)  # batch size 3: left-padded rows of different lengths
    for i, req in enumerate(requests):
        doc = task_docs[req.args[3]]
        cont = req.args[1] if isinstance(req.args[1], str) else doc_to_target(doc)
        expected_lp, expected_greedy = reference_loglikelihood(
            model, processor, doc["question"], doc_to_visual(doc), cont
        )
        assert got[i][0] == pytest.approx(expected_lp, rel=1e-4, abs=1e-4)
        assert got[i][0] < 0
        assert got[i][1] == expected_greedy


def test_loglikelihood_greedy_flag(adapter, eval_model, task_docs):
    model, processor = eval_model
    doc = task_docs[0]
    enc = processor.prompt(doc["question"], doc_to_visual(doc))
    ids = list(enc.input_ids)
    greedy_ids = []
    with torch.no_grad():
        for _ in range(3):  # the model's own greedy continuation, token by token
            logits = model(torch.tensor([ids]), pixel_values=enc.pixel_values, logits_to_keep=1).logits[0, -1]
            logits[model.config.image_token_id] = -float("inf")
            greedy_ids.append(int(logits.argmax()))
            ids.append(greedy_ids[-1])
    text = processor.tokenizer.decode(greedy_ids)
    if processor.tokenizer(text, add_special_tokens=False).input_ids != greedy_ids:
        pytest.skip("the greedy tokens do not survive a decode/encode round trip")
    (lp, greedy), (_, not_greedy) = adapter.loglikelihood(
        [ll_request(0, task_docs, target=text), ll_request(0, task_docs, target=text + " zzzz qqqq")]
    )
    assert greedy and not not_greedy
    assert lp <= 0
    assert adapter.loglikelihood([ll_request(0, task_docs, target="")]) == [(0.0, True)]


def test_adapter_errors(adapter, task_docs):
    with pytest.raises(KeyError, match="no document 99"):
        adapter.generate_until([Instance(("q", {}, doc_to_visual, 99, TASK, SPLIT))])
    with pytest.raises(NotImplementedError):
        adapter.generate_until_multi_round([])
    with pytest.raises(ValueError, match="until"):
        adapter.generate_until([gen_request(0, task_docs, until=5)])
    from minillava.eval.lmms_adapter import MiniLlavaLMMS

    with pytest.raises(ValueError, match="pretrained"):
        MiniLlavaLMMS()


def test_adapter_loads_a_model_directory(eval_model_dir, task_docs):
    from minillava.eval.lmms_adapter import MiniLlavaLMMS

    lm = MiniLlavaLMMS(pretrained=str(eval_model_dir), device="cpu", batch_size="2", max_new_tokens="2")
    lm.task_dict = {TASK: {SPLIT: task_docs}}
    assert lm.batch_size == 2 and lm.rank == 0 and lm.world_size == 1
    assert len(lm.generate_until([gen_request(0, task_docs), gen_request(3, task_docs)])) == 2


def test_registers_as_minillava_when_lmms_eval_is_importable(monkeypatch):
    """Stand-ins for lmms_eval.api.model.lmms and lmms_eval.api.registry.register_model."""
    import abc

    registry: dict[str, type] = {}

    class lmms(abc.ABC):  # noqa: N801 - lmms-eval's name
        def __init__(self) -> None:
            self._rank, self._world_size, self.task_dict = 0, 1, {}

        @abc.abstractmethod
        def loglikelihood(self, requests): ...

        @abc.abstractmethod
        def generate_until(self, requests): ...

        @abc.abstractmethod
        def generate_until_multi_round(self, requests): ...

    def register_model(*names):
        def decorate(cls):
            assert issubclass(cls, lmms)
            for name in names:
                registry[name] = cls
            return cls

        return decorate

    names = ("lmms_eval", "lmms_eval.api", "lmms_eval.api.model", "lmms_eval.api.registry")
    fake = {name: types.ModuleType(name) for name in names}
    fake["lmms_eval.api.model"].lmms = lmms
    fake["lmms_eval.api.registry"].register_model = register_model
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, name, module)
    import minillava.eval.lmms_adapter as adapter_module

    try:
        reloaded = importlib.reload(adapter_module)
        assert reloaded.HAVE_LMMS_EVAL
        assert registry["minillava"] is reloaded.MiniLlavaLMMS
        assert issubclass(reloaded.MiniLlavaLMMS, lmms)  # and every abstract method is implemented:
        assert not reloaded.MiniLlavaLMMS.__abstractmethods__
    finally:
        for name in fake:
            monkeypatch.delitem(sys.modules, name)
        importlib.reload(adapter_module)
    assert not adapter_module.HAVE_LMMS_EVAL or "lmms_eval" in sys.modules


def test_plugin_table_resolves_to_the_adapter():
    """lmms-eval's LMMS_EVAL_PLUGINS hook imports `{plugin}.models` and `{plugin}.models.{name}.{class}`."""
    from minillava.eval import lmms_adapter
    from minillava.eval.models import AVAILABLE_MODELS

    module = importlib.reload(importlib.import_module("minillava.eval.models.minillava"))
    assert getattr(module, AVAILABLE_MODELS["minillava"]) is lmms_adapter.MiniLlavaLMMS


def test_launcher_without_lmms_eval(capsys):
    from minillava.eval import lmms_adapter

    if lmms_adapter.HAVE_LMMS_EVAL:
        pytest.skip("lmms-eval is installed")
    assert lmms_adapter.main(["--tasks", "pope"]) == 2
    assert "pip install lmms-eval" in capsys.readouterr().err
