"""`export --format hf` writes the prompt format the model was trained with into the exported tokenizer.

transformers users build prompts with `apply_chat_template`: it must give exactly our prompt ids, for the
tokenizer's own template and for the built-in ones (vicuna_v1, chatml), BOS included where our processor adds it.
"""

from __future__ import annotations

import pytest
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer

from minillava.interop.hf import export_hf_llava, load_hf_llava

IMG = Image.new("RGB", (40, 30), (20, 200, 10))
CONV = [
    {"role": "user", "content": "<image>\nWhat is in the picture?"},
    {"role": "assistant", "content": "A cat sitting on a mat."},
    {"role": "user", "content": "how are you today?"},
    {"role": "assistant", "content": "yes"},
]
CASES = [
    ("llama", "auto"),  # the tokenizer's own ChatML template
    ("llama", "vicuna_v1"),
    ("llama", "chatml"),
    ("llama+bos", "vicuna_v1"),  # a tokenizer that prepends BOS (Llama's, OPT's): the template must carry it
    ("llama+bos", "chatml"),
]


def with_bos(processor):
    """The same processor on a copy of its tokenizer that prepends <s> to every text, as Llama's and OPT's do."""
    import copy

    from tokenizers.processors import TemplateProcessing

    from minillava.processor import Processor

    tok = copy.deepcopy(processor.tokenizer)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.convert_tokens_to_ids("<s>"))]
    )
    p = Processor(tok, processor.image_transform, processor.tokens_per_image, template=processor.template_name)
    assert p.bos_ids == [tok.bos_token_id]
    return p


def collapse(ids: list[int], image_id: int) -> list[int]:
    return [t for k, t in enumerate(ids) if t != image_id or k == 0 or ids[k - 1] != image_id]


@pytest.mark.parametrize(("llm", "template"), CASES)
def test_exported_tokenizer_chat_template_reproduces_our_prompt_ids(build_tiny, tmp_path, llm, template):
    model, processor = build_tiny(llm=llm.removesuffix("+bos"), template=template)
    if llm.endswith("+bos"):
        processor = with_bos(processor)
    own_template = processor.tokenizer.chat_template
    out = export_hf_llava(model.eval(), processor, tmp_path / "llava")
    assert processor.tokenizer.chat_template == own_template  # the caller's tokenizer is left as it was
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template, "the exported tokenizer has no chat template"
    image_id = processor.image_token_id
    for messages, generation in ((CONV[:1], True), (CONV[:3], True), (CONV, False), (CONV[:2], False)):
        ours = processor.encode(messages, [IMG], add_generation_prompt=generation)
        theirs = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation, return_dict=False)
        assert collapse(ours.input_ids, image_id) == list(theirs), (template, messages, generation)
    if template != "auto":  # a built-in template: exported as Jinja, with its system prompt and roles
        text = tok.apply_chat_template(CONV, tokenize=False)
        assert ("USER: <image>" in text) == (template == "vicuna_v1")
    try:
        llava_processor = AutoProcessor.from_pretrained(out)
    except (OSError, ValueError):  # no LlavaProcessor in this transformers: the tokenizer alone carries it
        return
    assert llava_processor.chat_template == tok.chat_template


@pytest.mark.parametrize(("llm", "template"), CASES[1:3])
def test_reimported_export_keeps_the_prompt(build_tiny, tmp_path, llm, template):
    """Import picks the exported template (not a silent vicuna_v1 default) and builds the same ids."""
    model, processor = build_tiny(llm=llm, template=template)
    out = export_hf_llava(model.eval(), processor, tmp_path / "llava")
    _, again = load_hf_llava(out)
    for generation, messages in ((True, CONV[:3]), (False, CONV)):
        want = processor.encode(messages, [IMG], add_generation_prompt=generation)
        got = again.encode(messages, [IMG], add_generation_prompt=generation)
        assert got.input_ids == want.input_ids and got.labels == want.labels
