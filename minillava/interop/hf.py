"""Read and write transformers `LlavaForConditionalGeneration` and `LlavaNextForConditionalGeneration`
directories (the llava-hf layout).

Import reads the safetensors shards and maps their keys onto minillava's three parts, so a 7B checkpoint is
never built twice (once as a Llava, once as a MiniLlava). Export writes the current key layout
(`model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.*`), and only
for models transformers' Llava computes identically; anything else raises `ExportError` saying why.

Feature selection is the same on both sides: `hidden_states[layer]` of the encoder, then Llava's "default"
strategy drops exactly one leading token (the CLS) and "full" keeps them all; minillava's "patch" drops all
prefix tokens and "cls_patch" keeps them.

LLaVA-NeXT is the same model plus AnyRes: `image_grid_pinpoints` and the learned `image_newline`, which map
onto minillava's `AnyResPacker`; its image processor squashes the base view to the tower's size ("resize").
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from minillava.anyres import AnyRes
from minillava.config import ModelConfig, ProjectorConfig, VisionConfig
from minillava.fileio import atomic_dir
from minillava.images import ImageTransform
from minillava.model import MiniLlava, build_anyres
from minillava.processor import Processor, save_tokenizer
from minillava.projectors import MLPProjector
from minillava.vision import HF_TOWERS, HFVisionTower

log = logging.getLogger(__name__)

LLAVA_MODEL_TYPE = "llava"
LLAVA_NEXT_MODEL_TYPE = "llava_next"  # LLaVA-NeXT: Llava + AnyRes
# Vision configs whose encoder transformers' Llava builds with AutoModel exactly as minillava does; a full
# CLIP/SigLIP config (text tower included) would make Llava build the whole dual encoder.
LLAVA_VISION_TYPES = ("clip_vision_model", "siglip_vision_model", "dinov2")
# Checkpoint prefix -> minillava part. The current layout nests everything but the head under `model.`;
# the older one keeps the full causal LM under `language_model.`.
# LLaVA-NeXT's `image_newline` is a bare parameter: its entry is the whole key.
CURRENT_LAYOUT = {
    "model.vision_tower.": "vision",
    "model.multi_modal_projector.": "projector",
    "model.language_model.": "llm_base",
    "lm_head.": "llm_head",
    "model.image_newline": "anyres",
}
OLDER_LAYOUT = {
    "vision_tower.": "vision",
    "multi_modal_projector.": "projector",
    "language_model.": "llm",
    "image_newline": "anyres",
}
ADAPTER_MARKERS = ("lora_", ".base_layer.", "modules_to_save", "original_module")


class ExportError(ValueError):
    """The model has no exact transformers Llava equivalent; the message says which part and why."""


# ---- shared helpers -----------------------------------------------------------------------------------


def is_hf_llava_dir(path: str | Path) -> bool:
    """A directory whose config.json says model_type "llava" or "llava_next"."""
    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") in (LLAVA_MODEL_TYPE, LLAVA_NEXT_MODEL_TYPE)
    except (OSError, ValueError, AttributeError):  # missing, unreadable, not JSON, or not a JSON object
        return False


def _skip_init() -> contextlib.AbstractContextManager[None]:
    """Random init of a 7B model takes minutes and every weight is overwritten by the checkpoint anyway."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: pay for the init
        return contextlib.nullcontext()
    return no_init_weights()


def _aliases(module: nn.Module) -> dict[str, set[str]]:
    """Parameter name -> the other names of the same tensor (tied embeddings)."""
    groups: dict[int, set[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), set()).add(name)
    return {name: names - {name} for names in groups.values() for name in names}


def _load_exact(module: nn.Module, state: dict[str, torch.Tensor], what: str, source: Path) -> None:
    """Strict load, except that one name of a tied pair is enough (checkpoints store tied tensors once)."""
    expected = module.state_dict()
    aliases = _aliases(module)
    missing = sorted(k for k in expected if k not in state and not aliases.get(k, set()) & state.keys())
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: the {what} weights do not match its config: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    try:
        module.load_state_dict(state, strict=False)  # strictness checked above, tied aliases allowed
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{source}: the {what} weights do not fit its config: {e}") from None


# ---- import -------------------------------------------------------------------------------------------


def load_hf_llava(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[MiniLlava, Processor]:
    """Load a transformers Llava or LlavaNext directory as a MiniLlava and its Processor, without building one."""
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in (LLAVA_MODEL_TYPE, LLAVA_NEXT_MODEL_TYPE):
        raise ValueError(f"{path}: model_type is {config.model_type!r}, not 'llava' or 'llava_next'")
    next_ = config.model_type == LLAVA_NEXT_MODEL_TYPE
    _check_projector_config(config, path)
    select_layer = _select_layer(config, path)
    # Everything cheap is checked before the (possibly many-GB) weights are read.
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_cfg = _image_processor_config(path)
    image_token = image_cfg.get("image_token") or "<image>"
    _check_image_token(tokenizer, image_token, config.image_token_id, path)
    transform = (_next_image_transform if next_ else _image_transform)(image_cfg, config.vision_config.image_size, path)
    pinpoints = _pinpoints(config, image_cfg, path) if next_ else None

    vision_model, projector, llm, newline = _load_modules(config, path, dtype)
    vision = HFVisionTower(VisionConfig(source=str(path), select_layer=select_layer), vision_model)
    # The strategy's meaning depends on the encoder's prefix tokens, known once the tower exists.
    vision.config.select_feature = _select_feature(config.vision_feature_select_strategy, vision.prefix_tokens, path)
    vision.requires_grad_(False).eval()
    model_cfg = ModelConfig(
        vision=vision.config, projector=ProjectorConfig(name="mlp2x_gelu"), llm_source=str(path),
        template=_pick_template(tokenizer, path), aspect=transform.aspect, resize_backend=transform.resize_backend,
        image_token=image_token, image_token_id=config.image_token_id, image_grid_pinpoints=pinpoints,
    )  # fmt: skip
    try:
        anyres = build_anyres(model_cfg, vision, projector, config.text_config.hidden_size, dtype)
    except ValueError as e:  # e.g. "full" with a CLS encoder: transformers' LlavaNext cannot lay that out either
        raise ValueError(f"{path}: {e}") from None
    if anyres is not None:
        _load_exact(anyres, newline, "image_newline", path)
    elif newline:
        raise ValueError(f"{path}: a 'llava' checkpoint with an image_newline weight (LLaVA-NeXT is 'llava_next')")
    model = MiniLlava(model_cfg, vision, projector, llm, anyres).eval()
    processor = Processor(
        tokenizer, transform, model.tokens_per_image, image_token, model_cfg.template, anyres=model.anyres_layout
    )
    return model, processor


def _load_modules(
    config: PretrainedConfig, path: Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, MLPProjector, PreTrainedModel, dict[str, torch.Tensor]]:
    """Build the vision encoder, projector and causal LM empty, then fill them strictly from the shards.

    The checkpoint's `image_newline` (LLaVA-NeXT), if any, comes back as a state dict for the AnyRes packer.
    """
    vision_model = _empty_vision_model(config.vision_config, path, dtype)
    llm = _empty_llm(config, dtype)
    projector = MLPProjector(config.vision_config.hidden_size, config.text_config.hidden_size).to(dtype)
    parts = _split_checkpoint(_read_checkpoint(path), llm.base_model_prefix, path)
    _load_exact(vision_model, parts["vision"], "vision tower", path)
    # Llava's projector reads raw features: minillava's input standardisation stays the identity
    parts["projector"] |= {"feature_mean": projector.feature_mean, "feature_std": projector.feature_std}
    _load_exact(projector, parts["projector"], "projector", path)
    _load_exact(llm, parts["llm"], "language model", path)
    return vision_model, projector, llm, parts["anyres"]


def _check_projector_config(config: PretrainedConfig, path: Path) -> None:
    """minillava's mlp2x_gelu is Linear(bias) -> exact GELU -> Linear(bias); nothing else maps onto it."""
    if config.projector_hidden_act != "gelu":
        raise ValueError(
            f"{path}: projector_hidden_act is {config.projector_hidden_act!r}; minillava's mlp2x_gelu projector "
            "uses exact 'gelu' only"
        )
    if not getattr(config, "multimodal_projector_bias", True):
        raise ValueError(f"{path}: multimodal_projector_bias is false; minillava's mlp2x_gelu projector has biases")


def _select_layer(config: PretrainedConfig, path: Path) -> int:
    layer = config.vision_feature_layer
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ValueError(
            f"{path}: vision_feature_layer is {layer!r}; minillava reads one layer, so only an int is supported "
            "(several layers concatenate features into a wider projector input)"
        )
    return layer


def _select_feature(strategy: str, prefix_tokens: int, path: Path) -> str:
    """Llava's "default" drops exactly one token, which is minillava's "patch" only for one-CLS encoders."""
    if strategy == "full":
        return "cls_patch" if prefix_tokens else "patch"  # identical for SigLIP; "patch" is the plain name
    if strategy == "default" and prefix_tokens == 1:
        return "patch"
    if strategy == "default":
        raise ValueError(
            f"{path}: vision_feature_select_strategy 'default' drops one leading token, but this encoder has "
            f"{prefix_tokens} prefix tokens, so minillava cannot reproduce it"
        )
    raise ValueError(f"{path}: unknown vision_feature_select_strategy {strategy!r}; expected 'default' or 'full'")


def _empty_vision_model(vision_config: PretrainedConfig, path: Path, dtype: torch.dtype) -> PreTrainedModel:
    if vision_config.model_type not in LLAVA_VISION_TYPES:
        raise ValueError(
            f"{path}: vision_config model_type {vision_config.model_type!r} is not supported; "
            f"supported: {', '.join(LLAVA_VISION_TYPES)}"
        )
    with _skip_init():
        return HF_TOWERS[vision_config.model_type]._from_config(copy.deepcopy(vision_config), dtype=dtype).eval()


def _empty_llm(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    text_config = copy.deepcopy(config.text_config)
    # Llava ties lm_head to the embeddings by its own flag (it already ORs in text_config's), so the bare LLM
    # must follow that flag or a tied checkpoint would leave lm_head unloaded.
    text_config.tie_word_embeddings = bool(config.tie_word_embeddings)
    with _skip_init():
        llm = AutoModelForCausalLM.from_config(text_config, dtype=dtype)
    llm.tie_weights()  # skipped along with the init
    return llm.eval()


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors is read)"
        )
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(path / name))
    return state


def _split_checkpoint(
    state: dict[str, torch.Tensor], llm_prefix: str, path: Path
) -> dict[str, dict[str, torch.Tensor]]:
    """Checkpoint keys -> {"vision", "projector", "llm"} state dicts, from either key layout."""
    current = any(k.startswith(("model.", "lm_head.")) for k in state)
    layout = CURRENT_LAYOUT if current else OLDER_LAYOUT
    parts: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "projector": {}, "llm": {}, "anyres": {}}
    for key, tensor in state.items():
        prefix = next((p for p in layout if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(
                f"{path}: unexpected checkpoint key {key!r} for the {'current' if current else 'older'} layout"
            )
        part, rest = layout[prefix], key[len(prefix) :]
        if part == "llm_base":  # Llava's language_model is the bare decoder: the causal LM's base_model
            part, rest = "llm", f"{llm_prefix}.{rest}"
        elif part == "llm_head":
            part, rest = "llm", f"lm_head.{rest}"
        elif part == "anyres":
            rest = f"image_newline{rest}"
        parts[part][rest] = tensor
    return parts


def _check_image_token(tokenizer: Any, image_token: str, image_token_id: int, path: Path) -> None:
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if token_id != image_token_id:
        raise ValueError(
            f"{path}: the tokenizer maps {image_token!r} to id {token_id}, but config.json's image_token_index is "
            f"{image_token_id}"
        )


def _image_processor_config(path: Path) -> dict[str, Any]:
    """The image-processor settings plus `image_token`, from preprocessor_config.json and/or processor_config.json.

    transformers >= 5 nests the image processor inside processor_config.json; older releases (and the
    llava-hf repos) keep a separate preprocessor_config.json.
    """
    cfg: dict[str, Any] = {}
    processor = path / "processor_config.json"
    if processor.exists():
        data = json.loads(processor.read_text())
        cfg.update(data.get("image_processor", {}))
        if data.get("image_token"):
            cfg["image_token"] = data["image_token"]
    preprocessor = path / "preprocessor_config.json"
    if preprocessor.exists():
        cfg.update(json.loads(preprocessor.read_text()))
    if "image_mean" not in cfg or "image_std" not in cfg:
        raise ValueError(f"{path}: no image processor config with image_mean/image_std (preprocessor_config.json)")
    return cfg


def _side(size: Any, path: Path, key: str) -> int:
    """A square side from an image-processor size: an int, {"height", "width"} or {"shortest_edge"}."""
    if isinstance(size, int):
        return size
    if isinstance(size, dict) and "shortest_edge" in size:
        return int(size["shortest_edge"])
    if isinstance(size, dict) and size.get("height") == size.get("width") and size.get("height"):
        return int(size["height"])
    raise ValueError(f"{path}: image processor {key} {size!r} is not square; minillava feeds square images")


# What minillava's ImageTransform computes; an image processor configured otherwise would be imported wrong silently
_REPRODUCED = {"do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
               "do_convert_rgb": True}  # fmt: skip


def _check_reproducible(cfg: dict[str, Any], path: Path) -> None:
    for key, value in _REPRODUCED.items():
        got = cfg.get(key, value)
        if got is not None and not (got == value or (isinstance(value, float) and abs(got - value) < 1e-9)):
            raise ValueError(
                f"{path}: the image processor sets {key}={got!r}; minillava reproduces {key}={value!r} only "
                "(bicubic resize, 1/255 rescale, normalisation, RGB), so its pixels would differ"
            )


def _image_transform(cfg: dict[str, Any], image_size: int, path: Path) -> ImageTransform:
    _check_reproducible(cfg, path)
    crops = bool(cfg.get("do_center_crop", "crop_size" in cfg))  # CLIPImageProcessor crops unless told not to
    # do_pad: LlavaImageProcessor expands to a mean-coloured square first, LLaVA-1.5's "pad".
    aspect = "pad" if cfg.get("do_pad") else "center_crop" if crops else "resize"
    key = "crop_size" if crops and "crop_size" in cfg else "size"
    side = _side(cfg.get(key, image_size), path, key)
    if side != image_size:
        raise ValueError(
            f"{path}: the image processor makes {side}px images but the vision tower takes {image_size}px; "
            "transformers' Llava would fail on them too"
        )
    return ImageTransform(side, tuple(cfg["image_mean"]), tuple(cfg["image_std"]), aspect, _resize_backend(cfg))


def _resize_backend(cfg: dict[str, Any]) -> str:
    """A `...Fast` image processor (transformers 4's torchvision one) resizes as torchvision does; any other as PIL
    does, as LLaVA was trained (transformers 5 picks its torchvision back end for those too where torchvision is
    installed; `resize_backend` in the saved model's processor config chooses)."""
    return "torchvision" if str(cfg.get("image_processor_type", "")).endswith("Fast") else "pil"


def _next_image_transform(cfg: dict[str, Any], image_size: int, path: Path) -> ImageTransform:
    """LlavaNextImageProcessor squashes the base view to `size` and cuts tiles of `crop_size`; both must be the
    tower's input, as in every LLaVA-NeXT checkpoint (minillava uses one side for both)."""
    _check_reproducible(cfg, path)
    side = _side(cfg.get("size", image_size), path, "size")
    crop = _side(cfg.get("crop_size", side), path, "crop_size")
    if side != image_size or crop != image_size:
        raise ValueError(
            f"{path}: the image processor makes {side}px base views and {crop}px tiles but the vision tower takes "
            f"{image_size}px"
        )
    return ImageTransform(side, tuple(cfg["image_mean"]), tuple(cfg["image_std"]), "resize", _resize_backend(cfg))


def _pinpoints(config: PretrainedConfig, image_cfg: dict[str, Any], path: Path) -> list[list[int]]:
    """The model's grid pinpoints; the image processor must cut images for the same ones."""
    pinpoints = [list(p) for p in config.image_grid_pinpoints]
    processor = [list(p) for p in image_cfg.get("image_grid_pinpoints", pinpoints)]
    if processor != pinpoints:
        raise ValueError(
            f"{path}: the image processor's image_grid_pinpoints {processor} differ from config.json's {pinpoints}"
        )
    return pinpoints


def _pick_template(tokenizer: Any, path: Path) -> str:
    """The tokenizer's chat template if it renders plain-string contents, else vicuna_v1 (LLaVA-1.5's), said in
    the log: a prompt format is a choice the user must see, not a silent default.

    llava-hf templates iterate over `content` as a list of {"type": ...} parts; given minillava's string
    contents they silently drop the user's text, so they must not be used.
    """
    if not getattr(tokenizer, "chat_template", None):
        reason = "the tokenizer has no chat template"
    else:
        probe = "Zq7 probe"
        try:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": probe}], tokenize=False)
        except Exception as e:  # any template error means we cannot use it
            rendered, reason = "", f"its chat template fails on a plain-text message ({e})"
        else:
            reason = "its chat template drops plain-string message contents"
        if probe in rendered:
            return "auto"
    log.warning("%s: prompt template vicuna_v1 (LLaVA-1.5's): %s; pass --template to choose another", path, reason)
    return "vicuna_v1"


# ---- export -------------------------------------------------------------------------------------------


def export_hf_llava(model: MiniLlava, processor: Processor, out_dir: str | Path) -> Path:
    """Write a `LlavaForConditionalGeneration` + `LlavaProcessor` directory atomically, or raise ExportError.

    An AnyRes model becomes a `LlavaNextForConditionalGeneration` + `LlavaNextProcessor` directory.
    """
    strategy, extra_tokens = _export_feature_strategy(model)
    _check_export_projector(model)
    _check_export_anyres(model, processor)
    llm = _merged_llm(model.llm)
    _check_export_llm(llm)
    config = _llava_config(model, llm, strategy)
    state = _llava_state_dict(model, llm)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        config.save_pretrained(tmp)
        _save_weights(state, tmp)
        if getattr(llm, "generation_config", None) is not None:
            llm.generation_config.save_pretrained(tmp)
        _save_processor(model, processor, strategy, extra_tokens, tmp)
    return out_dir


def _export_feature_strategy(model: MiniLlava) -> tuple[str, int]:
    """(vision_feature_select_strategy, tokens Llava's processor adds beyond the grid before "default" drops one)."""
    vision = model.vision
    if not isinstance(vision, HFVisionTower):
        raise ExportError(
            f"vision backend {model.config.vision.backend!r} cannot be exported: transformers' Llava builds its "
            "vision tower from a transformers config (CLIP, SigLIP or DINOv2 vision model)"
        )
    vc = vision.model.config
    if vc.model_type not in LLAVA_VISION_TYPES:
        raise ExportError(
            f"vision encoder {vc.model_type!r} cannot be exported; transformers' Llava is checked here with: "
            f"{', '.join(LLAVA_VISION_TYPES)}"
        )
    if vision.image_size != vc.image_size:
        raise ExportError(
            f"vision image_size {vision.image_size} differs from the encoder's {vc.image_size}: minillava "
            "interpolates position embeddings, transformers' Llava does not"
        )
    if vision.prefix_tokens == 0 or model.config.vision.select_feature == "cls_patch":
        return "full", vision.prefix_tokens
    if vision.prefix_tokens == 1:
        return "default", 1
    raise ExportError(
        f"select_feature 'patch' drops {vision.prefix_tokens} prefix tokens, but Llava's 'default' strategy drops "
        "exactly one"
    )


def _check_export_projector(model: MiniLlava) -> None:
    if type(model.projector) is not MLPProjector:
        raise ExportError(
            f"projector {model.config.projector.name!r} has no transformers Llava equivalent: Llava's "
            "multi_modal_projector is Linear -> GELU -> Linear (minillava 'mlp2x_gelu')"
        )


def _check_export_anyres(model: MiniLlava, processor: Processor) -> None:
    if model.anyres is not None and processor.image_transform.aspect != "resize":
        raise ExportError(
            f"the AnyRes base view uses aspect {processor.image_transform.aspect!r}; transformers' LlavaNext "
            "squashes it to the tower's size (aspect 'resize')"
        )


def _merged_llm(llm: PreTrainedModel) -> PreTrainedModel:
    """The LLM with any peft adapters merged into its weights, on a copy so the caller's model keeps training."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft, hence no adapters
        return llm
    if not any(isinstance(m, BaseTunerLayer) for m in llm.modules()):
        return llm
    llm = copy.deepcopy(llm)
    if hasattr(llm, "merge_and_unload"):  # a PeftModel wrapper
        return llm.merge_and_unload()
    # Adapters injected in place (get_peft_model keeps the wrapped model's modules): merge each layer and
    # put its base layer back, which is what merge_and_unload does.
    for name, module in list(llm.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(llm.get_submodule(parent_name) if parent_name else llm, child, module.get_base_layer())
    return llm


def _check_export_llm(llm: PreTrainedModel) -> None:
    hidden = llm.get_input_embeddings().embedding_dim
    if hidden != llm.config.hidden_size:
        raise ExportError(
            f"the LLM embeds tokens in {hidden} dims but its hidden_size is {llm.config.hidden_size}; Llava's "
            "projector outputs hidden_size"
        )
    if getattr(llm.config, "final_logit_softcapping", None):
        raise ExportError("the LLM soft-caps its logits (final_logit_softcapping); Llava's lm_head does not")
    if llm.get_output_embeddings() is not getattr(llm, "lm_head", None):
        raise ExportError("the LLM's output layer is not named lm_head, which is where Llava keeps it")


def _llava_config(model: MiniLlava, llm: PreTrainedModel, strategy: str) -> PretrainedConfig:
    from transformers import LlavaConfig, LlavaNextConfig

    anyres = {} if model.anyres is None else {"image_grid_pinpoints": [list(p) for p in model.anyres.layout.pinpoints]}
    config = (LlavaNextConfig if anyres else LlavaConfig)(
        vision_config=copy.deepcopy(model.vision.model.config),
        text_config=copy.deepcopy(llm.config),
        image_token_index=model.config.image_token_id,
        image_seq_length=model.tokens_per_image,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=model.config.vision.select_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)),
        **anyres,
    )
    config.architectures = ["LlavaNextForConditionalGeneration" if anyres else "LlavaForConditionalGeneration"]
    config.dtype = model.dtype
    return config


def folded_projector_state(projector: MLPProjector) -> dict[str, torch.Tensor]:
    """Llava's projector has no input standardisation: fold it into the first linear map, exactly:
    W (x - m) / s + b = (W / s) x + (b - (W / s) m)."""
    weight = projector.linear_1.weight / projector.feature_std  # (Dl, Dv) / (Dv,)
    bias = projector.linear_1.bias - weight @ projector.feature_mean
    state = {k: v for k, v in projector.state_dict().items() if not k.startswith("feature_")}
    return state | {"linear_1.weight": weight.detach(), "linear_1.bias": bias.detach()}


def _llava_state_dict(model: MiniLlava, llm: PreTrainedModel) -> dict[str, torch.Tensor]:
    state = {f"model.vision_tower.{k}": v for k, v in model.vision.model.state_dict().items()}
    state.update({f"model.multi_modal_projector.{k}": v for k, v in folded_projector_state(model.projector).items()})
    if model.anyres is not None:
        state["model.image_newline"] = model.anyres.image_newline
    base = f"{llm.base_model_prefix}."
    aliases = _aliases(llm)
    written: set[str] = set()
    for key, tensor in llm.state_dict().items():
        if aliases.get(key, set()) & written:  # tied: stored once, under the first name (the embeddings)
            continue
        if any(marker in key for marker in ADAPTER_MARKERS):
            raise ExportError(f"the LLM still holds adapter weights after merging ({key}); merge them first")
        if key.startswith(base):
            state[f"model.language_model.{key[len(base) :]}"] = tensor
        elif key.startswith("lm_head."):
            state[key] = tensor
        else:
            raise ExportError(f"LLM weight {key!r} is neither in its base model ({base}*) nor in lm_head")
        written.add(key)
    return {k: v.detach().contiguous() for k, v in state.items()}


def _save_weights(state: dict[str, torch.Tensor], directory: Path) -> None:
    from huggingface_hub import save_torch_state_dict

    # Shards and writes the index for big models, like transformers' own save_pretrained.
    save_torch_state_dict(state, directory, metadata={"format": "pt"})


def _image_processor_dict(transform: ImageTransform, anyres: AnyRes | None) -> dict[str, Any]:
    """ImageTransform -> a CLIPImageProcessor / LlavaImageProcessor / LlavaNextImageProcessor config that
    preprocesses the same way."""
    side = transform.size
    cfg: dict[str, Any] = {
        "image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(transform.mean), "image_std": list(transform.std),
        "size": {"shortest_edge": side}, "do_center_crop": True, "crop_size": {"height": side, "width": side},
    }  # fmt: skip
    if anyres is not None:  # base view squashed to `size`, tiles of `crop_size`; do_pad pads the crop count only
        pinpoints = [list(p) for p in anyres.pinpoints]
        cfg.update(image_processor_type="LlavaNextImageProcessor", do_pad=True, image_grid_pinpoints=pinpoints)
    elif transform.aspect == "resize":
        cfg.update(size={"height": side, "width": side}, do_center_crop=False)
        del cfg["crop_size"]
    elif transform.aspect == "pad":  # LlavaImageProcessor pads to a square of the mean colour, as minillava does
        cfg.update(image_processor_type="LlavaImageProcessor", do_pad=True)
    return cfg


def _export_chat_template(processor: Processor) -> str | None:
    """The prompt format of `processor` as a transformers chat template, or None (plain: no chat format)."""
    if processor.template_name == "auto" and getattr(processor.tokenizer, "chat_template", None):
        return processor.tokenizer.chat_template
    jinja = processor.template.jinja()
    if jinja is None:
        return None
    # apply_chat_template tokenizes without special tokens: the BOS our processor adds goes into the template.
    return ("{{ bos_token }}" + jinja) if processor.bos_ids and processor.tokenizer.bos_token else jinja


def _save_processor(model: MiniLlava, processor: Processor, strategy: str, extra_tokens: int, directory: Path) -> None:
    """Tokenizer and image processor always; a Llava(Next)Processor on top when this transformers can build one.

    The tokenizer carries the chat template the model was trained with (its own for `auto`; vicuna_v1 and
    chatml written as Jinja), so transformers' `apply_chat_template` gives the training prompt's ids."""
    chat_template = _export_chat_template(processor)
    tokenizer = processor.tokenizer
    saved_template = getattr(tokenizer, "chat_template", None)
    tokenizer.chat_template = chat_template  # for the files written here only; the user's tokenizer is restored
    try:
        _save_tokenizer_and_processors(model, processor, strategy, extra_tokens, directory, chat_template)
    finally:
        tokenizer.chat_template = saved_template


def _save_tokenizer_and_processors(
    model: MiniLlava, processor: Processor, strategy: str, extra_tokens: int, directory: Path, chat_template: str | None
) -> None:
    save_tokenizer(processor.tokenizer, directory)  # the fallback below leaves this copy: keep its legacy flag
    (directory / "preprocessor_config.json").write_text(
        json.dumps(_image_processor_dict(processor.image_transform, processor.anyres), indent=2) + "\n"
    )
    try:
        from transformers import AutoImageProcessor, LlavaNextProcessor, LlavaProcessor

        llava_processor = (LlavaProcessor if processor.anyres is None else LlavaNextProcessor)(
            image_processor=AutoImageProcessor.from_pretrained(directory),
            tokenizer=processor.tokenizer,
            patch_size=model.vision.model.config.patch_size,
            vision_feature_select_strategy=strategy,
            num_additional_image_tokens=extra_tokens,
            image_token=processor.image_token,
            chat_template=chat_template,
        )
        llava_processor.save_pretrained(directory)
    except (ImportError, OSError, ValueError, TypeError, AttributeError) as e:
        # The tokenizer and preprocessor_config.json are already written: AutoTokenizer, AutoImageProcessor
        # and the model still load; only the one-call LlavaProcessor is missing.
        warnings.warn(f"wrote no Llava(Next)Processor config ({type(e).__name__}: {e})", stacklevel=2)
