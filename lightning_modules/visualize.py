"""Drawing detections (pyramidlab-predict) and the validation-images callback.

Drawing is torchvision's (``draw_bounding_boxes``, ``draw_segmentation_masks``); this module
picks colours per class, orders boxes by score and puts ground truth beside predictions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichModelSummary
from torch import Tensor

log = logging.getLogger("pyramidlab")

# tab10 then tab20's light shades, as RGB: one colour per class label (cycled past 20)
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
)
GT_COLOR = (0, 255, 0)


def class_color(label: int) -> tuple[int, int, int]:
    return PALETTE[int(label) % len(PALETTE)]


def to_uint8(image: Tensor) -> Tensor:
    """(3, H, W) float in [0, 1] or uint8 -> uint8 on the CPU."""
    image = image.detach().cpu()
    if image.dtype == torch.uint8:
        return image
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def draw_detections(
    image: Tensor,
    pred: dict[str, Tensor],
    class_names: Sequence[str] | None = None,
    *,
    scores: bool = True,
    color: tuple[int, int, int] | None = None,
    box_width: int = 2,
    mask_alpha: float = 0.4,
) -> Tensor:
    """Boxes, "name score" labels and masks on a copy of ``image``.

    Args:
        image: (3, H, W) uint8 or float in [0, 1].
        pred: ``boxes`` (N, 4) XYXY in the image's pixels, ``labels`` (N,) in ``0..K-1``,
            optionally ``scores`` (N,) and ``masks`` (N, H, W) bool (or (N, 1, H, W)).
        class_names: name per label (default: the label number).
        scores: write the score after the name.
        color: one colour for every box (ground truth); default: a colour per class.
    Returns:
        (3, H, W) uint8. The highest-scoring box is drawn last (on top).
    """
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    out = to_uint8(image)
    boxes = pred["boxes"].detach().cpu().float()
    labels = pred["labels"].detach().cpu().long()
    score = pred.get("scores")
    order = torch.argsort(score.detach().cpu(), stable=True) if score is not None else torch.arange(len(boxes))
    if len(order) == 0:
        return out
    boxes, labels = boxes[order], labels[order]
    colors = [color or class_color(int(lb)) for lb in labels]
    masks = pred.get("masks")
    if masks is not None and len(masks):
        masks = masks.detach().cpu()[order]
        masks = (masks[:, 0] if masks.dim() == 4 else masks).bool()
        out = draw_segmentation_masks(out, masks, alpha=mask_alpha, colors=colors)
    names = [class_names[int(lb)] if class_names and int(lb) < len(class_names) else str(int(lb)) for lb in labels]
    if scores and score is not None:
        names = [f"{n} {float(s):.2f}" for n, s in zip(names, score.detach().cpu()[order])]
    return draw_bounding_boxes(out, boxes, labels=names, colors=colors, width=box_width)


def side_by_side(left: Tensor, right: Tensor, gap: int = 4) -> Tensor:
    """Two (3, H, W) uint8 images in one row with a white gap."""
    h = max(left.shape[1], right.shape[1])
    canvas = torch.full((3, h, left.shape[2] + gap + right.shape[2]), 255, dtype=torch.uint8)
    canvas[:, : left.shape[1], : left.shape[2]] = left
    canvas[:, : right.shape[1], left.shape[2] + gap:] = right
    return canvas


def stack_rows(rows: Sequence[Tensor], gap: int = 4) -> Tensor:
    """(3, H_i, W_i) uint8 images stacked vertically, left-aligned, with white gaps."""
    w = max(r.shape[2] for r in rows)
    h = sum(r.shape[1] for r in rows) + gap * (len(rows) - 1)
    canvas = torch.full((3, h, w), 255, dtype=torch.uint8)
    y = 0
    for r in rows:
        canvas[:, y: y + r.shape[1], : r.shape[2]] = r
        y += r.shape[1] + gap
    return canvas


def _wandb_boxes(pred: dict[str, Tensor], class_names: Sequence[str], with_scores: bool) -> dict[str, Any]:
    box_data = []
    for i, (b, lb) in enumerate(zip(pred["boxes"].tolist(), pred["labels"].tolist())):
        entry = {"position": {"minX": b[0], "minY": b[1], "maxX": b[2], "maxY": b[3]}, "domain": "pixel",
                 "class_id": int(lb), "box_caption": class_names[int(lb)] if int(lb) < len(class_names) else str(lb)}
        if with_scores:
            s = float(pred["scores"][i])
            entry["scores"] = {"score": s}
            entry["box_caption"] += f" {s:.2f}"
        box_data.append(entry)
    return {"box_data": box_data, "class_labels": {i: n for i, n in enumerate(class_names)}}


class ValidationImages(L.Callback):
    """A fixed handful of validation images, ground truth | predictions, after every validation.

    The first ``num_images`` items of the validation set (the same ones every time, as the
    network sees them: resized) are run through the model after each validation. Rank 0
    writes ``<dirpath>/step<global step>.png`` (one row per image: ground truth in green on
    the left, predictions coloured per class with scores on the right) and logs them to every
    image-capable logger: W&B as ``wandb.Image`` with ``ground_truth`` / ``predictions`` box
    layers (key ``val/images``), TensorBoard as ``val/images/<i>`` images.

    Args:
        dirpath: folder of the PNGs (``${paths.output_dir}/val_images``).
        num_images: how many validation images; 0 turns the callback off.
        score_threshold: predictions below it are not drawn.
    """

    def __init__(self, dirpath: str, num_images: int = 4, score_threshold: float = 0.3) -> None:
        if int(num_images) < 0:
            raise ValueError(f"callbacks.val_images.num_images={num_images}: expected 0 (off) or more images")
        self.dirpath = Path(dirpath)
        self.num_images = int(num_images)
        self.score_threshold = float(score_threshold)
        self.last_path: Path | None = None

    def _items(self, trainer: L.Trainer) -> list[tuple[Tensor, dict]]:
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
        dataset = getattr(loader, "dataset", None)
        if dataset is None:
            return []
        items = []
        for i in range(min(self.num_images, len(dataset))):
            item = dataset[i]
            if item is not None:  # an unreadable image skipped by the dataset
                items.append(item)
        return items

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.num_images == 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        net = getattr(pl_module, "net", None)
        items = self._items(trainer)
        if net is None or not items:
            return
        dm = getattr(trainer, "datamodule", None)
        try:
            names = list(dm.class_names) if dm is not None else []
        except (AttributeError, RuntimeError):
            names = []
        names = names or [str(i) for i in range(getattr(net, "num_classes", 0))]
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                preds = net([img.to(pl_module.device) for img, _ in items])
        finally:
            net.train(was_training)
        rows, logged = [], []
        for (img, target), pred in zip(items, preds):
            pred = {k: v.detach().cpu() for k, v in pred.items()}
            keep = pred["scores"] >= self.score_threshold
            pred = {k: v[keep] for k, v in pred.items()}
            gt = {"boxes": torch.as_tensor(target["boxes"]), "labels": target["labels"]}
            if "masks" in pred and "masks" in target:
                gt["masks"] = torch.as_tensor(target["masks"]).bool()
            image = to_uint8(img)
            rows.append(side_by_side(draw_detections(image, gt, names, scores=False, color=GT_COLOR),
                                     draw_detections(image, pred, names)))
            logged.append((image, gt, pred))
        grid = stack_rows(rows)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        from torchvision.io import write_png

        path = self.dirpath / f"step{trainer.global_step:08d}.png"
        write_png(grid, str(path))
        self.last_path = path
        self._log(trainer, rows, logged, names)

    def _log(self, trainer: L.Trainer, rows: list[Tensor], logged: list, names: list[str]) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        step = trainer.global_step
        for lg in trainer.loggers:
            if isinstance(lg, TensorBoardLogger):
                for i, row in enumerate(rows):
                    lg.experiment.add_image(f"val/images/{i}", row, step, dataformats="CHW")
            elif isinstance(lg, WandbLogger):
                lg.log_image(
                    "val/images",
                    images=[img.permute(1, 2, 0).numpy() for img, _, _ in logged],
                    step=step,
                    boxes=[{"ground_truth": _wandb_boxes(gt, names, False), "predictions": _wandb_boxes(p, names, True)}
                           for _, gt, p in logged],
                )


class ModelSummary(RichModelSummary):
    """Lightning's rich model summary without FLOPs when none were counted (no ``example_input_array``:
    a column of zeros and "Total FLOPs: 0"). ``enabled`` follows ``trainer.enable_model_summary``."""

    def __init__(self, enabled: bool = True, max_depth: int = 1, **summarize_kwargs: Any) -> None:
        super().__init__(max_depth=max_depth if enabled else 0, **summarize_kwargs)

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs) -> None:
        if total_flops:
            RichModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                       total_training_modes, total_flops, **summarize_kwargs)
            return
        # Lightning's layout with the FLOPs column and line left out (its table hard-codes the column)
        from lightning.pytorch.utilities.model_summary.model_summary import (
            get_formatted_model_size,
            get_human_readable_count,
        )
        from rich import get_console
        from rich.table import Table

        data = [col for col in summary_data if col[0] != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in data:
            table.add_column(name, justify="right" if name in ("Params", "Params per Device") else "left",
                             style="dim" if name == " " else None)
        for row in zip(*(values for _, values in data)):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        trainable = get_human_readable_count(int(trainable_parameters))
        frozen = get_human_readable_count(int(total_parameters - trainable_parameters))
        console.print(f"[bold]Trainable params[/]: {trainable}   [bold]Non-trainable params[/]: {frozen}   "
                      f"[bold]Total params[/]: {get_human_readable_count(int(total_parameters))}   "
                      f"[bold]Size (MB)[/]: {get_formatted_model_size(model_size)}   "
                      f"[bold]Modules in train / eval mode[/]: {total_training_modes['train']} / "
                      f"{total_training_modes['eval']}")
