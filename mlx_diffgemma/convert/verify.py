"""`mlx-diffgemma verify`: checks an MLX model directory as `load` and chat will use it,
and optionally compares its logits with another directory's."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from ..models.checkpoint import FLOAT_DTYPES, ConversionError, TensorRef, scan_checkpoint
from ..models.loader import check_sidecars
from ..models.recipes import module_quantization
from ..models.weights import QUANT_SUFFIXES, hf_to_mlx_name, is_vision_tensor
from .commands import fraction, positive_int, run_cli
from .plan import model_args, read_config, source_record
from .write import human_bytes


class VerifyError(ValueError):
    """An MLX directory that fails `verify`."""


# -- verify ---------------------------------------------------------------------------------------


def verify(
    mlx_path: Union[str, Path],
    against: Optional[Union[str, Path]] = None,
    seed: int = 0,
    prompt_length: int = 8,
    canvases: int = 4,
    atol: float = 1e-3,
    min_agreement: Optional[float] = None,
) -> Dict[str, Any]:
    """Checks an MLX directory: config.json parses and describes a DiffusionGemma model
    and its quantization record is well formed; the index names only files that exist
    and every key it lists is in its shard (the same scan as `convert`'s); every shard's
    header is valid safetensors (contiguous, non-overlapping, covering the file); every
    tensor the config implies is present with the implied shape and a float dtype
    (quantized ones: packed width and scales matching the recorded bits and group size),
    nothing else but the vision tower; the tokenizer loads, its chat template compiles
    and the generation parameters are valid (what `load` and chat need).

    With `against=<unquantized HF dir>` both are loaded by the runtime and the logits of
    `canvases` random canvases after a random prompt are compared: returns the max
    abs difference and the argmax agreement. Raises VerifyError if an unquantized
    directory of the same dtype differs by more than `atol`, or if the agreement is
    below `min_agreement` (when given). Returns a report dict.
    """
    path = Path(mlx_path)
    cfg_path = path / "config.json"
    try:
        config = read_config(path)
        _, expected = model_args(config, cfg_path)
        record = source_record(config, str(cfg_path))
    except ConversionError as e:
        raise VerifyError(str(e)) from e
    problems: List[str] = []
    try:
        tensors = scan_checkpoint(path, problems)
    except ConversionError as e:  # an unreadable index: nothing else can be checked
        raise VerifyError(str(e)) from e
    shard_files = sorted({t.file.name for t in tensors.values()})
    problems += check_sidecars(path)
    found, quantized = _tensor_problems(tensors, expected, record)
    problems += found
    if problems:
        raise VerifyError(
            f"{path} failed verification ({len(problems)} problem(s)):\n  - " + "\n  - ".join(problems[:20])
        )
    report: Dict[str, Any] = {
        "path": str(path),
        "shards": len(shard_files),
        "tensors": len(tensors),
        "quantized_modules": quantized,
        "vision_tensors": sum(1 for k in tensors if is_vision_tensor(k)),
        "bytes": sum(t.nbytes for t in tensors.values()),
    }
    if against is not None:
        report.update(_compare_with(path, against, tensors, record, seed, prompt_length, canvases,
                                    atol, min_agreement))
    return report


def _tensor_problems(tensors: Dict[str, TensorRef], expected, record) -> Tuple[List[str], int]:
    """What is wrong with the tensors against the shapes the config implies and the
    quantization record (one line each), and how many modules are quantized."""
    problems: List[str] = []
    names = {hf_to_mlx_name(k, keep_vision=True): k for k in tensors}
    names.pop(None, None)
    quantized = 0
    for name, shape in expected.items():
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if base is not None and f"{base}.scales" in names and name in names:
            w, s = tensors[names[name]], tensors[names[f"{base}.scales"]]
            b = tensors.get(names.get(f"{base}.biases", ""), None)
            qp = module_quantization(record, base)
            if qp is None:
                problems.append(f"{base} is quantized but config.json has no quantization record")
                continue
            bits, group, mode = qp
            cols = shape[-1]
            want_w = tuple(shape[:-1]) + (cols * bits // 32,)
            want_s = tuple(shape[:-1]) + (cols // group,)
            if w.dtype != "U32" or w.shape != want_w:
                problems.append(f"{base}.weight is {w.dtype}{list(w.shape)}, expected U32{list(want_w)} ({bits}-bit)")
            if mode == "affine":
                if s.shape != want_s or b is None or b.shape != want_s:
                    problems.append(f"{base}.scales/.biases do not match group size {group}: expected {list(want_s)}")
                problems += [
                    f"{t.file.name}: {t.key} is {t.dtype}, expected a float dtype"
                    for t in (s, b) if t is not None and t.dtype not in FLOAT_DTYPES
                ]
            else:
                if s.shape != want_s or s.dtype != "U8":
                    problems.append(f"{base}.scales is {s.dtype}{list(s.shape)}, expected U8{list(want_s)} ({mode})")
                if b is not None:
                    problems.append(f"{base}.biases is stored but {mode} keeps none")
            quantized += 1
        elif name in names:
            ref = tensors[names[name]]
            if ref.shape != tuple(shape):
                problems.append(f"{name} has shape {list(ref.shape)}, config implies {list(shape)}")
            if ref.dtype not in FLOAT_DTYPES:
                problems.append(f"{ref.file.name}: {name} is {ref.dtype}, expected a float dtype")
        else:
            problems.append(f"missing tensor {name}")
    extra = [
        k for k, n in ((k, hf_to_mlx_name(k, keep_vision=True)) for k in tensors)
        if n is not None and not is_vision_tensor(n) and n not in expected
        and not (n.endswith(QUANT_SUFFIXES) and n.rsplit(".", 1)[0] + ".weight" in expected)
    ]
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s), e.g. {', '.join(extra[:3])}")
    return problems, quantized


def _compare_with(path, against, tensors, record, seed, prompt_length, canvases, atol,
                  min_agreement) -> Dict[str, Any]:
    """The logit comparison of `verify(..., against=...)`, held to its thresholds."""
    try:
        report = compare_logits(path, against, seed=seed, prompt_length=prompt_length, canvases=canvases)
    except Exception as e:
        raise VerifyError(
            f"could not compare the logits of {path} and {against} ({type(e).__name__}: {e})"
        ) from e
    same_dtype = _dtype_of(tensors) == _dtype_of(scan_checkpoint(Path(against)))
    if record is None and same_dtype and report["max_abs_diff"] > atol:
        raise VerifyError(
            f"{path}: logits differ from {against} by {report['max_abs_diff']:.3g} "
            f"(> {atol}) although neither is quantized"
        )
    if min_agreement is not None and report["argmax_agreement"] < min_agreement:
        raise VerifyError(
            f"{path}: argmax agreement with {against} is {report['argmax_agreement']:.3f} "
            f"(< {min_agreement})"
        )
    return report


def _dtype_of(tensors: Dict[str, TensorRef]) -> Optional[str]:
    floats = [t.dtype for k, t in tensors.items() if t.dtype in FLOAT_DTYPES and not k.endswith(QUANT_SUFFIXES)]
    return max(set(floats), key=floats.count) if floats else None


def _load_runtime(path):
    try:
        from ..models.loader import load
    except ImportError:
        from ..models.loader import load
    model, _ = load(path)
    return model


def model_logits(model, prompt: np.ndarray, canvas: np.ndarray) -> np.ndarray:
    """Decoder logits [B, C, V] (float32) of `canvas` after encoding `prompt`."""
    import mlx.core as mx

    cache = model.make_cache()
    model.encode(mx.array(prompt), cache)
    logits = model.decode(mx.array(canvas), cache)
    mx.eval(logits)
    return np.array(logits.astype(mx.float32))


def compare_logits(
    mlx_path, against, seed: int = 0, prompt_length: int = 8, canvases: int = 4
) -> Dict[str, Any]:
    """Loads both directories with the runtime and compares the decoder logits of
    `canvases` uniformly random canvases (after a random prompt)."""
    a = _load_runtime(mlx_path)
    b = _load_runtime(against)
    V, C = a.args.vocab_size, a.args.canvas_length
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, V, size=(1, prompt_length))
    canvas = rng.integers(0, V, size=(canvases, C))
    prompt = np.repeat(prompt, canvases, axis=0)
    la = model_logits(a, prompt, canvas)
    lb = model_logits(b, prompt, canvas)
    return {
        "max_abs_diff": float(np.abs(la - lb).max()),
        "mean_abs_diff": float(np.abs(la - lb).mean()),
        "argmax_agreement": float((la.argmax(-1) == lb.argmax(-1)).mean()),
        "logit_correlation": float(np.corrcoef(la.ravel(), lb.ravel())[0, 1]),
        "positions": int(canvases * C),
    }


def add_verify_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `mlx-diffgemma verify` options."""
    p.add_argument("mlx_path", help="the MLX model directory to check")
    p.add_argument("--against", default=None,
                   help="an unquantized (HF) directory to compare the logits of random canvases with")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random prompt and canvases compared with --against (default 0)")
    p.add_argument("--canvases", type=positive_int, default=4, help="random canvases to compare (default 4)")
    p.add_argument("--min-agreement", type=fraction, default=None,
                   help="fail when the argmax agreement is below this fraction")
    return p


def main_verify(args: argparse.Namespace) -> int:
    from rich.console import Console

    out = Console()

    def run():
        report = verify(
            args.mlx_path,
            against=args.against,
            seed=args.seed,
            canvases=args.canvases,
            min_agreement=args.min_agreement,
        )
        out.print(f"[green]ok[/green] {report['path']}: {report['tensors']} tensors in "
                  f"{report['shards']} shard(s), {report['quantized_modules']} quantized modules, "
                  f"{human_bytes(report['bytes'])}")
        if "max_abs_diff" in report:
            out.print(
                f"logits vs {args.against}: max |diff| {report['max_abs_diff']:.4g}, mean "
                f"{report['mean_abs_diff']:.4g}, correlation {report['logit_correlation']:.4f}, "
                f"argmax agreement {report['argmax_agreement']:.3f} "
                f"over {report['positions']} positions"
            )
        return report

    return run_cli(run)
