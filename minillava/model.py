"""MiniLlava: vision tower -> projector -> splice into the LLM's input embeddings -> causal LM.

    pixel_values (I, 3, H, W) --tower--> (I, P, Dv) --projector--> (I, N, D)
    input_ids    (B, T)       --embed--> (B, T, D)  --splice N-token runs at <image> slots--> (B, T, D)
    --LLM--> hidden (B, T, D) --lm_head at the positions we need--> logits

With AnyRes (LLaVA-NeXT) an image is several crops and its token count depends on its size:

    pixel_values (C, 3, H, W), image_sizes (I, 2) --tower, projector--> (C, P, D)
    --AnyResPacker: per image, base view + unpadded tile map + a newline per row--> (sum_i N_i, D) --splice

The LLM never knows it is looking at a picture: it reads N more embeddings in its input sequence.
With `fusion="xattn"` (Flamingo) an image stays one marker token and gated cross-attention blocks in front
of the decoder layers read its features instead (see fusion.py).
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from minillava.anyres import AnyRes, AnyResPacker
from minillava.config import ModelConfig
from minillava.data.packing import packed_attention
from minillava.fileio import atomic_dir
from minillava.fusion import XATTN_WEIGHTS, MediaState, add_xattn, arrange_media, bare_llm_state, xattn_blocks
from minillava.images import ImageTransform
from minillava.processor import IGNORE_INDEX, Processor
from minillava.projectors import Projector, build_projector
from minillava.sources import resolve_source
from minillava.splice import features_per_row, splice_image_features
from minillava.vision import VisionTower, load_vision_tower

PROJECTOR_WEIGHTS = "projector.safetensors"
FUSIONS = ("splice", "xattn")
ANYRES_WEIGHTS = "anyres.safetensors"


@dataclass
class SoftTargets:
    """Distillation targets: rows whose supervised positions learn a teacher's distribution, not their label
    tokens (train/distill.py: text-only rows learn the base LLM's, so tuning keeps what it knew)."""

    rows: torch.Tensor  # (B,) bool
    logprobs: torch.Tensor  # (n, V) the teacher's log-probabilities at those rows' supervised positions, in order
    weight: float = 1.0  # one position's KL counts as this many label tokens' cross-entropy


@dataclass
class Output:
    loss: torch.Tensor | None = None  # mean next-token loss over supervised positions
    logits: torch.Tensor | None = None  # (B, T', V): all positions, or the last `logits_to_keep`
    past_key_values: object | None = None
    media: MediaState | None = None  # xattn: what a cached continuation reads (pass it back with the cache)
    num_supervised: int = 0
    hidden: torch.Tensor | None = None  # (B, T, D) the LLM's last hidden states, when asked (`return_hidden`)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, so left padding does not shift rotary positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


@functools.cache
def _cache_keyword(cls: type) -> str:
    """transformers >= 5.2x names the KV cache `cache`; earlier releases `past_key_values`."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def build_anyres(
    config: ModelConfig, vision: VisionTower, projector: Projector, dim: int, dtype: torch.dtype
) -> AnyResPacker | None:
    """The AnyRes packer when the config has grid pinpoints; it lays each crop's tokens out on the patch grid."""
    if not config.image_grid_pinpoints:
        return None
    rows, cols = vision.patch_grid
    n = projector.num_tokens(vision.patch_grid, vision.extra_tokens)
    if n != rows * cols:
        raise ValueError(
            f"AnyRes needs one token per patch of the {rows}x{cols} grid, but projector {config.projector.name!r} "
            f"with select_feature {config.vision.select_feature!r} gives {n} per crop"
        )
    layout = AnyRes(tuple((int(h), int(w)) for h, w in config.image_grid_pinpoints), vision.image_size, (rows, cols))
    return AnyResPacker(layout, dim).to(dtype)


class MiniLlava(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        vision: VisionTower,
        projector: Projector,
        llm: PreTrainedModel,
        anyres: AnyResPacker | None = None,
    ) -> None:
        super().__init__()
        if config.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {config.fusion!r}; use one of {', '.join(FUSIONS)}")
        if config.fusion == "xattn" and config.image_grid_pinpoints:
            raise ValueError("AnyRes (image_grid_pinpoints) works with fusion splice only, not xattn")
        if config.fusion == "xattn" and not len(xattn_blocks(llm)):
            raise ValueError("fusion xattn: the LLM has no cross-attention blocks (add them with add_xattn)")
        self.config = config
        self.vision = vision
        self.projector = projector
        self.llm = llm
        self.anyres = anyres

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def build(cls, config: ModelConfig, dtype: torch.dtype = torch.float32) -> tuple[MiniLlava, Processor]:
        """Assemble an untrained model (fresh projector) from a vision source and an LLM source."""
        if config.fusion == "xattn" and config.projector.name != "perceiver":
            raise ValueError(
                f"fusion xattn reads Perceiver latents: use projector perceiver, not {config.projector.name!r}"
            )
        vision_dir = None if config.vision.source.startswith("torchvision:") else resolve_source(config.vision.source)
        llm_dir = resolve_source(config.llm_source)
        tokenizer = AutoTokenizer.from_pretrained(llm_dir)
        tokenizer.add_special_tokens({"additional_special_tokens": [config.image_token]})
        config.image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
        llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=dtype)
        if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
            llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        vision = load_vision_tower(config.vision, vision_dir, dtype)
        config.vision.image_size = vision.image_size  # saved, so a reload never falls back to the config's size
        projector = build_projector(
            config.projector.name,
            vision.hidden_size,
            llm.get_input_embeddings().embedding_dim,
            vision.patch_grid,
            **config.projector.options,
        ).to(dtype)
        if config.fusion == "xattn":
            add_xattn(llm, config.xattn)
        anyres = build_anyres(config, vision, projector, llm.get_input_embeddings().embedding_dim, dtype)
        model = cls(config, vision, projector, llm, anyres)
        transform = (
            ImageTransform.from_dir(vision_dir, vision.image_size, config.aspect, config.resize_backend)
            if vision_dir is not None
            else ImageTransform(vision.image_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), config.aspect,
                                config.resize_backend)  # fmt: skip
        )
        processor = Processor(
            tokenizer, transform, model.tokens_per_image, config.image_token, config.template,
            anyres=model.anyres_layout,
        )  # fmt: skip
        return model, processor

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, dtype: torch.dtype = torch.float32, allow_lora_adapter: bool = False
    ) -> tuple[MiniLlava, Processor]:
        directory = Path(directory)
        if (directory / "lora_adapter").is_dir() and not allow_lora_adapter:
            raise ValueError(
                f"{directory} holds an unmerged LoRA adapter: run `minillava merge-lora --model {directory} --out DIR`"
            )
        config = ModelConfig.load(directory)
        llm = AutoModelForCausalLM.from_pretrained(directory / "llm", dtype=dtype)
        vision, projector = load_image_encoder(directory, config, llm.get_input_embeddings().embedding_dim, dtype)
        if config.fusion == "xattn":
            add_xattn(llm, config.xattn)
            xattn_blocks(llm).load_state_dict(load_file(directory / XATTN_WEIGHTS), strict=True)
        anyres = build_anyres(config, vision, projector, llm.get_input_embeddings().embedding_dim, dtype)
        if anyres is not None:
            anyres.load_state_dict(load_file(directory / ANYRES_WEIGHTS), strict=True)
        model = cls(config, vision, projector, llm, anyres)
        processor = Processor.from_pretrained(directory)
        if processor.tokens_per_image != model.tokens_per_image:
            raise ValueError(
                f"{directory}: processor expands an image to {processor.tokens_per_image} tokens but the model "
                f"produces {model.tokens_per_image}"
            )
        if processor.anyres != model.anyres_layout:
            raise ValueError(
                f"{directory}: the processor's AnyRes layout {processor.anyres} differs from the model's "
                f"{model.anyres_layout}"
            )
        return model.eval(), processor

    def save_pretrained(self, directory: str | Path, processor: Processor) -> None:
        """Write atomically: a temp dir beside the target, then one rename. Safetensors only."""
        with atomic_dir(directory) as tmp:
            self.save_image_encoder(tmp, processor)
            if self.config.fusion == "xattn":  # llm/ stays a plain transformers model; the blocks go beside it
                self.llm.save_pretrained(tmp / "llm", state_dict=bare_llm_state(self.llm))
                save_file({k: v.contiguous() for k, v in self.xattn.state_dict().items()}, tmp / XATTN_WEIGHTS)
            else:
                self.llm.save_pretrained(tmp / "llm")
            if self.anyres is not None:
                save_file({k: v.contiguous() for k, v in self.anyres.state_dict().items()}, tmp / ANYRES_WEIGHTS)
            processor.save_pretrained(tmp)

    def save_image_encoder(self, directory: Path, processor: Processor) -> None:
        """The config, the vision tower and the projector: the half of the model that turns pixels into image
        tokens (`load_image_encoder` reads it back; exports whose LLM runs elsewhere keep just this half)."""
        self.config.save(directory)
        self.vision.save_pretrained(directory / "vision")
        transform = processor.image_transform
        (directory / "vision" / "preprocessor_config.json").write_text(json.dumps(transform.to_hf_dict(), indent=2))
        save_file({k: v.contiguous() for k, v in self.projector.state_dict().items()}, directory / PROJECTOR_WEIGHTS)

    # ---- shapes ---------------------------------------------------------------------------------
    @property
    def tokens_per_image(self) -> int:
        """Tokens of one crop: of each image, or with AnyRes, of its base view; 1 (a media marker) under xattn."""
        if self.config.fusion == "xattn":
            return 1  # a media marker: the features are cross-attended, not spliced
        return self.projector.num_tokens(self.vision.patch_grid, self.vision.extra_tokens)

    @property
    def xattn(self) -> nn.ModuleDict:
        """The gated cross-attention blocks (they live inside the LLM), keyed by decoder layer; empty for splice."""
        return xattn_blocks(self.llm) if self.config.fusion == "xattn" else nn.ModuleDict()

    @property
    def anyres_layout(self) -> AnyRes | None:
        return None if self.anyres is None else self.anyres.layout

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    # ---- forward --------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """(I, 3, H, W) -> (I, N, D); with AnyRes (C crops, 3, H, W) and (I, 2) sizes -> (sum_i N_i, D)."""
        if self.vision.training or any(p.requires_grad for p in self.vision.parameters()):
            features = self.vision(pixel_values)
        else:
            with torch.no_grad():
                features = self.vision(pixel_values)  # (I, P, Dv)
        return self.project(features, image_sizes)

    def project(self, features: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Vision features (C, P, Dv) -> image tokens (C, N, D), or with AnyRes, packed per image (sum_i N_i, D)."""
        tokens = self.projector(features.to(self.projector_dtype))
        if self.anyres is None:
            return tokens
        if image_sizes is None:
            raise ValueError("an AnyRes model needs image_sizes, one (height, width) per image, with its pixels")
        return self.anyres(tokens, image_sizes)

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_counts: torch.Tensor | None = None,
    ) -> torch.Tensor:  # (B, T) -> (B, T, D)
        """Text embeddings with each image's N projected features written into its N placeholder slots.

        `image_counts` (B,), each row's number of images (the processor's collate gives it), lets the splice
        check every row's slots against its own images, not just the batch's total."""
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values, image_sizes)
        text = self.llm.get_input_embeddings()(input_ids)
        if image_features is None and text.is_cuda and torch.cuda.is_current_stream_capturing():
            # a CUDA-graph decode step (generate.py): the splice's slot count would read back to the host, which
            # capture forbids, and a generated token is never <image> (decode masks that logit)
            return text
        per_row = None if image_counts is None else self.features_per_row(image_counts, image_features, image_sizes)
        return splice_image_features(input_ids, text, image_features, self.config.image_token_id, per_row)

    def features_per_row(
        self, image_counts: torch.Tensor, image_features: torch.Tensor | None, image_sizes: torch.Tensor | None
    ) -> list[int]:
        """Image feature vectors that belong to each row: its images' token counts, images in reading order."""
        if self.anyres is not None and image_sizes is not None:  # AnyRes: a token count per image size
            per_image = [self.anyres.layout.num_tokens((int(h), int(w))) for h, w in image_sizes.tolist()]
        else:  # (I, N, D): N each
            per_image = [] if image_features is None else [image_features.shape[1]] * image_features.shape[0]
        return features_per_row(image_counts, per_image)

    def xattn_media(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_features: torch.Tensor | None,
        state: MediaState | None,
        continuation: bool,
        image_counts: torch.Tensor | None = None,  # (B,)
    ) -> tuple[torch.Tensor | None, torch.Tensor]:  # media (B, M, L, D), media_index (B, T)
        """xattn: the media this call cross-attends to. A prefill encodes its images; a KV-cached continuation
        reads its prefill's media, every new token attending to the latest image seen so far in its row."""
        if not continuation:
            if image_features is None and pixel_values is not None:
                image_features = self.encode_images(pixel_values)
            features = None if image_features is None else image_features.to(self.dtype)
            per_row = None if image_counts is None else [int(c) for c in image_counts.tolist()]
            return arrange_media(input_ids, features, self.config.image_token_id, per_row)
        if state is None:
            raise ValueError("fusion xattn: a cached continuation needs its prefill's media state (Output.media)")
        if (
            pixel_values is not None
            or image_features is not None
            or bool((input_ids == self.config.image_token_id).any())
        ):
            raise ValueError("fusion xattn: images go in the prefill, not in a cached continuation")
        return state.media, state.last[:, None].expand_as(input_ids)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.llm.get_output_embeddings()(hidden)
        cap = getattr(self.llm.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: object | None = None,
        use_cache: bool = False,
        return_logits: bool = True,
        logits_to_keep: int = 0,
        return_hidden: bool = False,  # a caller that projects only some positions (train/distill.py)
        media: MediaState | None = None,
        image_sizes: torch.Tensor | None = None,  # (I, 2) (height, width) of each image, AnyRes only
        image_counts: torch.Tensor | None = None,  # (B,) images of each row: the splice checks rows, not the total
        segment_ids: torch.Tensor | None = None,  # (B, T) packed rows: sample 1, 2, ... of each row, 0 padding
        soft_targets: SoftTargets | None = None,  # with labels: these rows' positions learn a distribution (KL)
        inputs_embeds: torch.Tensor | None = None,  # (B, T, D) from `embed`, images spliced: a chunked prefill's
    ) -> Output:
        if segment_ids is not None:
            self.check_packable(past_key_values, use_cache)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, -input_ids.shape[1] :]
        layer_kwargs = {}
        if inputs_embeds is not None and self.config.fusion != "splice":
            raise ValueError("inputs_embeds are spliced embeddings: fusion splice only")
        if self.config.fusion == "xattn":
            embeds = self.llm.get_input_embeddings()(input_ids)  # the <image> marker is an ordinary token here
            features, index = self.xattn_media(
                input_ids, pixel_values, image_features, media, past_key_values is not None, image_counts
            )
            layer_kwargs = {"media": features, "media_index": index}
        elif inputs_embeds is not None:
            embeds = inputs_embeds
        else:
            embeds = self.embed(input_ids, pixel_values, image_features, image_sizes, image_counts)
        if segment_ids is not None:  # once per forward: every decoder layer reads the same mask
            attention_mask, position_ids = packed_attention(segment_ids, self.llm.config._attn_implementation,
                                                            embeds.dtype)  # fmt: skip
        base = self.llm.base_model
        cache_kw = _cache_keyword(type(base))
        out = base(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{cache_kw: past_key_values},
            **layer_kwargs,  # the decoder layers receive these (see fusion.py)
        )
        hidden = out.last_hidden_state  # (B, T, D)
        result = Output(past_key_values=getattr(out, cache_kw, None) if use_cache else None)
        if use_cache and layer_kwargs:
            result.media = MediaState(features, index[:, -1])
        if labels is not None:
            result.loss, result.num_supervised = self.loss(hidden, labels, soft_targets)
        if return_logits:
            result.logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        if return_hidden:
            result.hidden = hidden
        return result

    def check_packable(self, past_key_values: object | None, use_cache: bool) -> None:
        """Packed rows (segment_ids) are a training layout: no KV cache, and spliced image tokens only (xattn
        would let a sample cross-attend to the previous sample's image)."""
        if self.config.fusion != "splice":
            raise ValueError("packed rows (--packing) need fusion splice, not xattn")
        if past_key_values is not None or use_cache:
            raise ValueError("packed rows (segment_ids) are for training forwards, not with a KV cache")

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor,
             soft_targets: SoftTargets | None = None) -> tuple[torch.Tensor, int]:  # fmt: skip
        """Next-token loss, with the vocabulary projection only at the supervised positions: cross-entropy with
        the label token, or KL(teacher || model) at the positions of `soft_targets.rows`; the mean of both."""
        if labels.shape != hidden.shape[:2]:
            raise ValueError(f"labels {tuple(labels.shape)} must match the spliced sequence {tuple(hidden.shape[:2])}")
        targets = labels[:, 1:]  # position t predicts token t+1
        keep = targets != IGNORE_INDEX
        logits = self.lm_head(hidden[:, :-1][keep]).float()  # (n_supervised, V)
        n = int(keep.sum())
        if n == 0:  # keep the graph connected (DDP) but contribute nothing
            return logits.sum() * 0.0, 0
        if soft_targets is None:
            return F.cross_entropy(logits, targets[keep]), n
        soft = soft_targets.rows.to(keep.device)[:, None].expand_as(keep)[keep]  # (n_supervised,) bool
        if (given := soft_targets.logprobs.shape[0]) != int(soft.sum()):
            raise ValueError(f"soft targets for {given} positions, their rows supervise {int(soft.sum())}")
        per_token = F.cross_entropy(logits, targets[keep], reduction="none")
        student = F.log_softmax(logits[soft], dim=-1)
        kl = F.kl_div(student, soft_targets.logprobs.float(), log_target=True, reduction="none").sum(-1)
        return per_token.masked_scatter(soft, kl * soft_targets.weight).mean(), n

    # ---- reporting ------------------------------------------------------------------------------
    def named_parts(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Parameters by part; under xattn the blocks inside the LLM are a part of their own, not the LLM's."""
        in_xattn = {id(p) for p in self.xattn.parameters()}
        parts = {
            "vision": list(self.vision.named_parameters()),
            "projector": list(self.projector.named_parameters()),
            "llm": [(n, p) for n, p in self.llm.named_parameters() if id(p) not in in_xattn],
        }
        if in_xattn:
            parts["xattn"] = list(self.xattn.named_parameters())
        if self.anyres is not None:
            parts["anyres"] = list(self.anyres.named_parameters())
        return parts

    def parameter_counts(self) -> dict[str, dict[str, int]]:
        counts = {}
        for name, named in self.named_parts().items():
            trainable = sum(p.numel() for _, p in named if p.requires_grad)
            counts[name] = {"trainable": trainable, "frozen": sum(p.numel() for _, p in named) - trainable}
        return counts


def load_image_encoder(
    directory: Path, config: ModelConfig, embed_dim: int, dtype: torch.dtype
) -> tuple[VisionTower, Projector]:
    """The vision tower and the projector (into the LLM's `embed_dim`) saved by `MiniLlava.save_image_encoder`."""
    vision = load_vision_tower(config.vision, directory / "vision", dtype)
    projector = build_projector(
        config.projector.name, vision.hidden_size, embed_dim, vision.patch_grid, **config.projector.options
    )
    state = load_file(directory / PROJECTOR_WEIGHTS)
    if "feature_mean" not in state:  # saved before projectors standardised their input: identity
        state |= {"feature_mean": projector.feature_mean, "feature_std": projector.feature_std}
    projector.load_state_dict(state, strict=True)
    return vision, projector.to(dtype)
