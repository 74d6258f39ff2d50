"""An lmms-eval model for minillava directories, so the standard VLM benchmarks run where you have the data.

    python -m minillava.eval.lmms_adapter --model minillava --model_args pretrained=DIR --tasks pope
    LMMS_EVAL_PLUGINS=minillava.eval python -m lmms_eval --model minillava --model_args pretrained=DIR ...

The first form registers the model and hands its arguments to lmms-eval's own command line; the second
uses lmms-eval's plugin hook (`minillava.eval.models`). Importing this module registers the class as
`minillava` when lmms-eval is installed; without lmms-eval it still imports, and `MiniLlavaLMMS` works on
any objects whose `args` follow lmms-eval's simple-model convention:

- generate_until: (context, gen_kwargs, doc_to_visual, doc_id, task, split)
- loglikelihood:  (context, doc_to_target, doc_to_visual, doc_id, task, split)

with docs looked up in `self.task_dict[task][split][doc_id]` (lmms-eval fills it in).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

try:  # lmms-eval is optional: register with it only where it is installed
    from lmms_eval.api.model import lmms as _Base
    from lmms_eval.api.registry import register_model as _register_model

    HAVE_LMMS_EVAL = True
except ImportError:
    _Base = object  # type: ignore[assignment,misc]
    _register_model = None
    HAVE_LMMS_EVAL = False

log = logging.getLogger("minillava.eval")
MODEL_NAME = "minillava"


class MiniLlavaLMMS(_Base):  # type: ignore[misc,valid-type]
    """lmms-eval "simple" model over a minillava model + processor (prompts go through its chat template).

    Arguments as lmms-eval passes them from `--model_args` (strings are parsed): `pretrained` (a model
    directory), `device`, `dtype`, `batch_size`, `max_new_tokens` (default for generate_until) and
    `template` (override the chat template). Python callers may pass `model` and `processor` instead of
    `pretrained`.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int | str = 1,
        max_new_tokens: int | str = 128,
        template: str | None = None,
        model: Any = None,
        processor: Any = None,
        **kwargs: Any,
    ) -> None:
        if HAVE_LMMS_EVAL:
            super().__init__()
        self._rank, self._world_size = 0, 1
        if not hasattr(self, "task_dict"):
            self.task_dict: dict = {}
        if kwargs:
            log.warning("minillava lmms adapter ignores arguments %s", ", ".join(sorted(kwargs)))
        if model is None or processor is None:
            if not pretrained:
                raise ValueError("minillava lmms adapter needs pretrained=DIR (or model= and processor=)")
            import minillava

            model, processor = minillava.load(str(pretrained), dtype, device or None)
        if template:
            processor = processor.with_template(template)
        self._model = model.eval()
        self.processor = processor
        self.pretrained = str(pretrained) if pretrained else type(model).__name__
        self.batch_size_per_gpu = int(batch_size) if str(batch_size) != "auto" else 1
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.max_new_tokens = int(max_new_tokens)

    # ---- what lmms-eval reads -------------------------------------------------------------------
    @property
    def model(self) -> Any:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return self._model.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    # ---- requests -------------------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: Any) -> Any:
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError):
            raise KeyError(f"no document {doc_id!r} in task {task!r} split {split!r} of task_dict") from None

    def _visuals(self, doc_to_visual: Callable | None, task: str, split: str, doc_id: Any) -> list[Any]:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self._doc(task, split, doc_id))
        if visuals is None:
            return []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        flat: list[Any] = []
        for v in visuals:
            flat.extend(v if isinstance(v, (list, tuple)) else [v])
        return [v for v in flat if v is not None]

    def _encode(self, context: str, visuals: list[Any], where: str):
        try:
            return self.processor.prompt(context, visuals)
        except (ValueError, OSError) as e:
            raise ValueError(f"{where}: {e}") from None

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Greedy (or sampled, if gen_kwargs say so) answers, batched among requests with equal gen_kwargs."""
        from minillava.generate import Generator

        generator = Generator(self._model, self.processor)
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            gen_kwargs = req.args[1] or {}
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        for indices in groups.values():
            cfg = self._generation_config(requests[indices[0]].args[1] or {})
            indices = sorted(indices, key=lambda i: -len(requests[i].args[0]))  # longest first: OOM shows early
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                encoded = []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args[:6]
                    visuals = self._visuals(doc_to_visual, task, split, doc_id)
                    encoded.append(self._encode(context, visuals, f"{task}/{split} doc {doc_id}"))
                for i, text in zip(chunk, generator.generate_batch(encoded, cfg), strict=True):
                    results[i] = text
                    self._cache("generate_until", requests[i].args, text)
        return [r if r is not None else "" for r in results]

    def _generation_config(self, gen_kwargs: dict):
        from minillava.generate import GenerationConfig

        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        if not isinstance(until, list):
            raise ValueError(f"gen_kwargs['until'] must be a string or a list, got {type(until).__name__}")
        sample = bool(gen_kwargs.get("do_sample", False)) and float(gen_kwargs.get("temperature") or 0) > 0
        if int(gen_kwargs.get("num_beams", 1) or 1) > 1:
            log.warning("minillava lmms adapter: beam search is not supported; decoding greedily")
        return GenerationConfig(
            max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            temperature=float(gen_kwargs.get("temperature") or 0.0) if sample else 0.0,
            top_p=float(gen_kwargs.get("top_p") or 1.0) if sample else 1.0,
            top_k=int(gen_kwargs.get("top_k") or 0) if sample else 0,
            stop=[s for s in until if isinstance(s, str) and s],
        )

    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(sum of log-probs of the continuation's tokens given context + images, whether greedy decoding
        would produce exactly those tokens). The context is the user turn (through the chat template, with
        the assistant prefix); the continuation is tokenised on its own, as the processor tokenises an
        assistant reply."""
        tok = self.processor.tokenizer
        items = []
        for i, req in enumerate(requests):
            context, doc_to_target, doc_to_visual, doc_id, task, split = req.args[:6]
            where = f"{task}/{split} doc {doc_id}"
            if isinstance(doc_to_target, str):
                continuation = doc_to_target
            else:
                continuation = str(doc_to_target(self._doc(task, split, doc_id)))
            enc = self._encode(context, self._visuals(doc_to_visual, task, split, doc_id), where)
            cont = tok(continuation, add_special_tokens=False).input_ids
            if len(enc.input_ids) + len(cont) > self.processor.max_length:
                raise ValueError(
                    f"{where}: context + continuation is {len(enc.input_ids) + len(cont)} tokens, over max_length "
                    f"{self.processor.max_length}"
                )
            items.append((i, enc, cont))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        items = [it for it in items if it[2]]  # an empty continuation has log-prob 0 and is trivially greedy
        items.sort(key=lambda it: -(len(it[1].input_ids) + len(it[2])))
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            for (i, _, _), value in zip(chunk, self._score_chunk(chunk), strict=True):
                results[i] = value
                self._cache("loglikelihood", requests[i].args, value)
        return results

    def _score_chunk(self, chunk: list) -> list[tuple[float, bool]]:
        from minillava.processor import Encoded

        full = [
            Encoded(enc.input_ids + cont, enc.input_ids + cont, enc.pixel_values, enc.image_sizes)
            for _, enc, cont in chunk
        ]
        batch = self.processor.collate(full, padding_side="left")  # every continuation ends in the last column
        keep = max(len(cont) for _, _, cont in chunk) + 1
        pixels, sizes = batch["pixel_values"], batch["image_sizes"]
        out = self._model(
            batch["input_ids"].to(self.device),
            batch["attention_mask"].to(self.device),
            None if pixels is None else pixels.to(self.device),
            logits_to_keep=keep,
            image_sizes=None if sizes is None else sizes.to(self.device),
            image_counts=batch["image_counts"],
        )
        logits = out.logits.float()  # (B, keep, V): position t predicts token t + 1
        logprobs = logits.log_softmax(-1)
        greedy_logits = logits.clone()
        greedy_logits[..., self._model.config.image_token_id] = -float("inf")  # never generated
        values = []
        for row, (_, _, cont) in enumerate(chunk):
            n = len(cont)
            target = torch.tensor(cont, device=logits.device)
            span = slice(keep - n - 1, keep - 1)
            lp = logprobs[row, span].gather(-1, target[:, None]).sum()
            greedy = bool((greedy_logits[row, span].argmax(-1) == target).all())
            values.append((float(lp), greedy))
        return values

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError("minillava lmms adapter: multi-round generation is not supported")

    def _cache(self, attr: str, args: Any, value: Any) -> None:
        hook = getattr(self, "cache_hook", None)
        if hook is not None and hasattr(hook, "add_partial"):
            hook.add_partial(attr, args, value)


if HAVE_LMMS_EVAL and _register_model is not None:
    MiniLlavaLMMS = _register_model(MODEL_NAME)(MiniLlavaLMMS)


def main(argv: list[str] | None = None) -> int:
    """`python -m minillava.eval.lmms_adapter ARGS`: lmms-eval's command line with `minillava` registered."""
    if not HAVE_LMMS_EVAL:
        print("minillava.eval.lmms_adapter: lmms-eval is not installed (pip install lmms-eval)", file=sys.stderr)
        return 2
    from lmms_eval.__main__ import cli_evaluate

    sys.argv = ["lmms_eval", *(sys.argv[1:] if argv is None else argv)]
    result = cli_evaluate()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
