"""ONNX Runtime as the CPU runtime of a served model: the same function, a fraction of PyTorch's per-operator cost.

On one CPU thread and one image, PyTorch spends most of a small network's pass outside the arithmetic: a 95 x 95
EfficientNet-Lite0 pass is 0.18 of a 224 pass in MACs but took 0.37 of its time (5.66 against 15.32 ms, folded and
channels-last). Exported to ONNX and run by ONNX Runtime's CPU provider it took 1.77 ms (0.19 of the 224 pass's
9.26), and AnchorNet's CAM of one 224 image 1.64 ms against 2.82 (``benchmarks/classifier_inference.py --runtime
onnxruntime``, docs/serving.md).

``OnnxRuntimeModel(model, example)`` exports ``model`` with torch's ONNX exporter (``torch.onnx.export(...,
dynamo=True)``, the batch dimension dynamic), opens an ONNX Runtime session on it and checks it against ``model``
on ``example``. It is a module that takes and returns CPU tensors, so the serving code calls it as it calls the
PyTorch model. The export is kept in a cache directory (``default_cache_dir()``, ``$ANCHORNET_ONNX_CACHE``) under a
hash of the model's weights, so that a replica started later on the same node loads it in a second. ``CamAndLogits``
is AnchorNet's CAM (Eq. 2) and logits as one module, so that the CAM's matrix product is exported with the network.

Optional: needs ``pip install 'anchornet[onnx]'`` (onnxruntime, onnx, onnxscript); ``require_onnxruntime`` says so
in one line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import nn

from anchornet import AnchorNet, class_activation_map

__all__ = [
    "RUNTIMES",
    "CamAndLogits",
    "OnnxRuntimeModel",
    "Runtime",
    "default_cache_dir",
    "export_key",
    "export_onnx",
    "prune_cache",
    "require_onnxruntime",
]

logger = logging.getLogger(__name__)

Runtime = Literal["torch", "onnxruntime"]
RUNTIMES: tuple[str, ...] = get_args(Runtime)

_PACKAGES = ("onnxruntime", "onnx", "onnxscript")


def require_onnxruntime() -> None:
    """Raise ``RuntimeError`` (one line, with the install command) unless ONNX Runtime and torch's exporter's
    dependencies are installed."""
    missing = [name for name in _PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(
            f"the onnxruntime runtime needs {', '.join(missing)}: pip install 'anchornet[onnx]' (or use the torch "
            "runtime)"
        )


class CamAndLogits(nn.Module):
    """AnchorNet's ``class_activation_map`` as a module: float images ``(B, 3, H, W)`` -> ``(cam, logits)``."""

    def __init__(self, model: AnchorNet) -> None:
        super().__init__()
        self.model = model

    @property
    def receptive_field(self) -> Any:
        return self.model.receptive_field

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return class_activation_map(self.model, images)


class OnnxRuntimeModel(nn.Module):
    """``model``'s forward pass run by ONNX Runtime on the CPU: tensors in, tensors out (one, or a tuple).

    Args:
        model: an eval-mode module on the CPU, as it will be served (folded, say); only its forward is exported.
        example: one input batch of the shape it will be given, batch size 2 or more (torch's exporter fixes a
            dimension of size 1).
        threads: ONNX Runtime's intra-op threads; default ``torch.get_num_threads()`` (a replica's
            ``torch_threads``). Its worker threads do not spin while waiting: a replica shares its cores.
        rtol: the outputs on ``example`` must match ``model``'s to this relative tolerance (and ``rtol / 10`` of
            the output's largest magnitude absolute); ``ValueError`` in one line otherwise.
        dynamic_dims: the input's dimensions that may differ from ``example``'s: the batch (0) by default, also
            the height and width (2, 3) for a fully convolutional network like AnchorNet. Others stay fixed.
        cache: keep the exported model in ``cache_dir`` (default ``default_cache_dir()``), named by a hash of
            what was exported (``export_key``), so that the next replica on the node starts in a second rather
            than exporting again (a Lite0 takes ~5 s, more on a loaded machine: too slow to scale up under load).
            An entry is used only if it passes the same check as a fresh export; otherwise it is exported again
            and replaced. A cache that cannot be written is skipped with a ``RuntimeWarning``.

    Attributes not of the forward pass (AnchorNet's ``receptive_field``, say) are read from ``model``.
    """

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        threads: int | None = None,
        rtol: float = 1e-3,
        dynamic_dims: tuple[int, ...] = (0,),
        cache: bool = True,
        cache_dir: str | Path | None = None,
    ) -> None:
        require_onnxruntime()
        super().__init__()
        if example.dim() == 0 or len(example) < 2:
            raise ValueError(f"the example batch must hold at least 2 inputs (the dynamic batch), got {len(example)}")
        devices = {t.device.type for t in itertools.chain(model.parameters(), model.buffers(), [example])}
        if devices != {"cpu"}:
            raise ValueError(f"ONNX Runtime runs models on the CPU here; this one is on {sorted(devices)}")
        model = model.eval()
        self.source = model
        self.threads = threads or torch.get_num_threads()
        with torch.inference_mode():
            expected = model(example)
        self.single = isinstance(expected, torch.Tensor)
        expected = (expected,) if self.single else tuple(expected)
        entry, cached = _cache_lookup(cache_dir, export_key(model, example, dynamic_dims)) if cache else (None, None)
        if cached is not None:
            try:
                self._open(cached)
                problem = self._mismatch(example, expected, rtol)
            except Exception as err:  # a truncated or foreign file: whatever ONNX Runtime raises, export again
                problem = f"unreadable: {err}".splitlines()[0]
            if problem is None:
                return
            logger.warning("cached %s does not fit %s (%s): exporting again", entry, type(model).__name__, problem)
        data = export_onnx(model, example, dynamic_dims)
        self._open(data)
        if (problem := self._mismatch(example, expected, rtol)) is not None:
            raise ValueError(f"ONNX Runtime's {problem} of this {type(model).__name__} differs from PyTorch's")
        if entry is not None:
            _write_atomically(entry, data)

    def _open(self, data: bytes) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.onnx_model = data  # what the session runs: kept so that a copy (pickle, deepcopy) can open its own

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["session"]  # an ONNX Runtime session cannot be pickled; the copy opens one on the same bytes
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._open(self.onnx_model)

    def _mismatch(self, example: torch.Tensor, expected: tuple[torch.Tensor, ...], rtol: float) -> str | None:
        """What of the session's outputs on ``example`` differs from ``expected``; None when they match."""
        got = self._run(example)
        if len(got) != len(expected):
            return f"number of outputs ({len(got)} against {len(expected)})"
        for index, (out, ref) in enumerate(zip(got, expected, strict=True)):
            if out.shape != ref.shape:
                return f"output {index} shape ({tuple(out.shape)} against {tuple(ref.shape)})"
            scale = float(ref.abs().max().clamp_min(1.0))
            if not torch.allclose(out, ref.float(), rtol=rtol, atol=rtol / 10 * scale):
                return f"output {index} (largest difference {(out - ref).abs().max().item():.3g})"
        return None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__"):
                raise
            return getattr(super().__getattr__("source"), name)

    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        array = np.ascontiguousarray(images.detach().cpu().float().numpy())
        return tuple(torch.from_numpy(out) for out in self.session.run(None, {self.input_name: array}))

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outputs = self._run(images)
        return outputs[0] if self.single else outputs


def default_cache_dir() -> Path:
    """``$ANCHORNET_ONNX_CACHE``, else ``$XDG_CACHE_HOME/anchornet/onnx`` (``~/.cache/anchornet/onnx``)."""
    if path := os.environ.get("ANCHORNET_ONNX_CACHE"):
        return Path(path)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "anchornet" / "onnx"


def export_key(model: nn.Module, example: torch.Tensor, dynamic_dims: tuple[int, ...]) -> str:
    """A hash of what ``export_onnx`` exports: the module's class, every parameter and buffer (names, shapes, dtypes,
    values), the example's shape, the dynamic dimensions, and the torch and ONNX Runtime versions."""
    import onnxruntime

    digest = hashlib.sha256()
    header = (type(model).__module__, type(model).__qualname__, tuple(example.shape), str(example.dtype))
    digest.update(repr((header, tuple(dynamic_dims), torch.__version__, onnxruntime.__version__)).encode())
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        digest.update(repr((name, tuple(tensor.shape), str(tensor.dtype))).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def _cache_lookup(cache_dir: str | Path | None, key: str) -> tuple[Path | None, bytes | None]:
    """``(entry, its bytes)`` of ``key`` in the cache (``default_cache_dir()`` unless given); the bytes are None when
    there is no entry yet, and both are None, with a warning, when the cache cannot be used (unreadable, or no home
    directory to put it in). A hit marks the entry recently used, the last to go when the cache is pruned."""
    try:
        entry = Path(cache_dir or default_cache_dir()) / f"{key}.onnx"
        if not entry.is_file():
            return entry, None
        cached = entry.read_bytes()
        os.utime(entry)
    except (OSError, RuntimeError) as err:
        warnings.warn(f"not using the ONNX export cache: {err}", RuntimeWarning, stacklevel=3)
        return None, None
    return entry, cached


def _write_atomically(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through a temporary file and a rename, so that a concurrent reader (another replica)
    sees the whole file or none; warns, and writes nothing, when the directory cannot be written."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.stem}.", delete=False) as tmp:
            tmp.write(data)
        os.chmod(tmp.name, 0o644)  # readable by whoever shares the cache, as a plain file would be
        os.replace(tmp.name, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp.name).unlink(missing_ok=True)
        warnings.warn(f"could not cache the exported model in {path.parent}: {err}", RuntimeWarning, stacklevel=3)
        return
    prune_cache(path.parent, keep=path)


def prune_cache(directory: Path, max_bytes: int | None = None, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used exports (``*.onnx``, by modification time, which a cache hit refreshes) until
    the cache holds at most ``max_bytes`` (default ``$ANCHORNET_ONNX_CACHE_MAX_BYTES``, else 2 GiB: about 150
    Lite0 exports); ``keep`` stays whatever its age. Returns what was removed. Files that vanish meanwhile (another
    replica pruning) are skipped."""
    limit = int(os.environ.get("ANCHORNET_ONNX_CACHE_MAX_BYTES", 2 * 1024**3)) if max_bytes is None else max_bytes
    entries = []
    for path in directory.glob("*.onnx"):
        try:
            stat = path.stat()
        except OSError:
            continue
        entries.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, path in sorted(entries):
        if total <= limit:
            break
        if path == keep:
            continue
        path.unlink(missing_ok=True)
        total -= size
        removed.append(path)
    return removed


def export_onnx(model: nn.Module, example: torch.Tensor, dynamic_dims: tuple[int, ...] = (0,)) -> bytes:
    """``model`` as a serialised ONNX model, ``dynamic_dims`` of its input dynamic (by default the batch)."""
    dims = {dim: torch.export.Dim.DYNAMIC for dim in dynamic_dims}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracing chatter
        program = torch.onnx.export(
            model, (example,), dynamo=True, dynamic_shapes=(dims,), verbose=False, optimize=True
        )
    return program.model_proto.SerializeToString()
