"""pyramidlab-export ckpt_path=FILE format=torchscript|onnx: a checkpoint's detector as one file, checked.

The exported module takes one image, (3, H, W) float in [0, 1], any size, and returns
``boxes`` (N, 4) XYXY in its pixels, ``scores`` (N,) and ``labels`` (N,) in ``0..K-1`` (the
PyTorch model's post-processing included: score filter, NMS, top detections). Both formats are
made by tracing (``torch.jit.trace`` / ``torch.onnx.export``'s TorchScript exporter): the necks
annotate module lists with Python 3.10 builtins (``list[nn.Module]``) that ``torch.jit.script``
does not parse, so scripting is not offered. After export, the file is loaded back and run on one
image (``input=`` or a generated one) next to the PyTorch model: ``export.json`` records the
largest score difference and the share of exported detections that match a PyTorch one (same
label, IoU >= 0.99). Detections tied in score (an untrained model's ~0.01 everywhere) may be
kept in a different order or set, hence ``min_matched`` rather than 1.0.

Which export to any input size (measured on a second image of another size, ``any_input_size``
in ``export.json``): RetinaNet, Faster R-CNN and Mask R-CNN with ``fpn``. The SMSL and SRF necks
compute resize targets from shapes in Python, which a trace stores as constants: their files take
only the size they were traced at (export with ``input=`` an image of the deployment size). FCOS
needs an image whose P7 is larger than 1x1 (> 128 px a side): GroupNorm refuses a 1x1 map when traced.

Not exported: masks (Mask R-CNN's and the cascade's mask branch is dropped: its paste-back of masks
into the image is Python code torchvision only traces for a fixed number of detections); the
model's output is boxes, scores and labels for every detector.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from lightning_modules import hydra_callbacks as H
from lightning_modules.paths import CONF_DIR

log = logging.getLogger("pyramidlab")

FORMATS = ("torchscript", "onnx")


def exportable(net: Any) -> Any:
    """``net`` as ``image (3, H, W) -> (boxes, scores, labels)``, the tensors a trace can follow."""
    import torch

    class BoxesScoresLabels(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            out = self.net([image])[0]
            return out["boxes"], out["scores"], out["labels"]

    return BoxesScoresLabels(net).eval()


def compare(ref: tuple, got: tuple) -> dict[str, Any]:
    """Exported vs PyTorch detections of one image (see the module docstring for the measures)."""
    import torch
    from torchvision.ops import box_iou

    rb, rs, rl = (t.detach().float() if i < 2 else t.detach() for i, t in enumerate(ref))
    gb, gs, gl = (torch.as_tensor(t).float() if i < 2 else torch.as_tensor(t) for i, t in enumerate(got))
    out: dict[str, Any] = {"detections_pytorch": int(len(rs)), "detections_exported": int(len(gs))}
    if len(rs) != len(gs):
        out.update(max_score_diff=None, matched=0.0)
        return out
    if len(rs) == 0:
        out.update(max_score_diff=0.0, matched=1.0)
        return out
    out["max_score_diff"] = float((rs.sort(descending=True).values - gs.sort(descending=True).values).abs().max())
    same = gl.long()[:, None] == rl.long()[None, :]
    out["matched"] = float(((box_iou(gb, rb) >= 0.99) & same).any(1).float().mean())
    return out


def check_image(cfg: DictConfig, data: DictConfig):
    """The image of the check, as the network sees it: ``input=`` (resized as evaluation resizes) or
    a seeded random one at ``data.min_size`` x ``data.max_size``."""
    import torch

    if cfg.input:
        from torchvision import tv_tensors

        from detection.data.coco import build_transforms
        from lightning_modules.predict import read_rgb

        image, _ = build_transforms(False, data.min_size, data.max_size)(tv_tensors.Image(read_rgb(Path(cfg.input))),
                                                                         {})
        return image.as_subclass(torch.Tensor)
    short = int(data.min_size[-1] if not isinstance(data.min_size, int | float) else data.min_size)
    gen = torch.Generator().manual_seed(0)
    return torch.rand(3, short, min(int(data.max_size), short * 4 // 3), generator=gen)


def export(cfg: DictConfig) -> dict[str, Any]:
    """Write ``model.pt`` / ``model.onnx`` and ``export.json`` into the run folder; returns the record."""
    import torch

    from detection.atomic import write_json_atomic
    from lightning_modules import outputs as OUT
    from lightning_modules.predict import load_detector

    fmt = str(cfg.format)
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt}: expected one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        try:
            import onnxruntime  # noqa: F401 - the check runs the file with it
        except ImportError as e:
            raise ValueError("format=onnx needs the onnx and onnxruntime packages: pip install onnx onnxruntime "
                             "(or format=torchscript)") from e
    loaded = load_detector(cfg.ckpt_path, "cpu")
    net = loaded.net
    if net.with_masks:
        log.warning(f"{net.name}: masks are not exported (boxes, scores and labels are)")
    model = exportable(net)
    image = check_image(cfg, loaded.config.data)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with torch.no_grad():
        ref = model(image)
        if fmt == "torchscript":
            path = out_dir / "model.pt"
            traced = torch.jit.trace(model, (image,), check_trace=False)
            traced.save(str(path))
            got = torch.jit.load(str(path))(image)
        else:
            import onnxruntime as ort

            path = out_dir / "model.onnx"
            torch.onnx.export(
                model, (image,), str(path), opset_version=int(cfg.opset), dynamo=False,
                input_names=["image"], output_names=["boxes", "scores", "labels"],
                dynamic_axes={"image": {1: "height", 2: "width"}, "boxes": {0: "n"}, "scores": {0: "n"},
                              "labels": {0: "n"}},
            )
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = session.run(None, {"image": image.numpy()})
        seconds = round(time.perf_counter() - start, 1)
        check = compare(ref, got)
        # A trace keeps sizes the model computes in Python (SMSL's gather to one level, the SRF
        # generator's crop) as constants: such a file only takes the traced size. Say which it is.
        other = torch.rand(3, image.shape[-2] + 32, image.shape[-1] - 32 if image.shape[-1] > 64 else image.shape[-1] + 32,
                           generator=torch.Generator().manual_seed(1))
        try:
            run = torch.jit.load(str(path)) if fmt == "torchscript" else (
                lambda x: session.run(None, {"image": x.numpy()}))
            other_check = compare(model(other), run(other))
            any_size = other_check["max_score_diff"] is not None and other_check["max_score_diff"] <= float(cfg.atol) \
                and other_check["matched"] >= float(cfg.min_matched)
        except Exception as e:  # noqa: BLE001 - a size the trace cannot take: recorded, not fatal
            log.debug(f"another input size fails: {e}")
            any_size = False
    record = {"format": fmt, "file": str(path), "checkpoint": str(cfg.ckpt_path), "detector": net.name,
              "neck": str(loaded.config.neck.get("_target_", "")), "image_size": list(image.shape[-2:]),
              "any_input_size": any_size, "export_seconds": seconds, "masks_exported": False, **check}
    if not any_size:
        log.warning(f"{path.name} takes only {image.shape[-2]}x{image.shape[-1]} images (sizes fixed by the trace); "
                    "export with input= an image of the deployment size")
    write_json_atomic(out_dir / "export.json", record)
    ok = (check["max_score_diff"] is not None and check["max_score_diff"] <= float(cfg.atol)
          and check["matched"] >= float(cfg.min_matched))
    OUT.console.print(f"{fmt}: {path} ({path.stat().st_size / 1e6:.1f} MB); check on a "
                    f"{image.shape[-2]}x{image.shape[-1]} image: {check['detections_exported']} detections, "
                    f"max score difference {check['max_score_diff']}, matched {check['matched']:.2f}")
    if not ok:
        raise ValueError(
            f"the exported model disagrees with PyTorch on the check image: {check} (atol={cfg.atol}, "
            f"min_matched={cfg.min_matched}); the file is kept at {path}"
        )
    return record


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def hydra_main(cfg: DictConfig) -> None:
    H.run_guarded(export, cfg)


def main() -> None:
    """Console script ``pyramidlab-export``."""
    H.main_with_hints(hydra_main, "export")


if __name__ == "__main__":
    main()
