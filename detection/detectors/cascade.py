"""Cascade R-CNN and Cascade Mask R-CNN (Cai & Vasconcelos) on torchvision's R-CNN parts.

As MMDetection and Detectron2 configure it: Faster R-CNN's RPN, then three box stages, each a
torchvision :class:`~torchvision.models.detection.roi_heads.RoIHeads` (its Matcher,
BalancedPositiveNegativeSampler and BoxCoder) with its own IoU threshold (0.5 / 0.6 / 0.7),
box-coder weights ((10,10,5,5) / (20,20,10,10) / (30,30,15,15), i.e. stds 0.1/0.05/0.033 on xy),
2-FC 1024 head and class-agnostic regressor. Stage t+1 trains on stage t's refined boxes
(detached), re-matched and re-sampled at its own threshold; losses are weighted 1 / 0.5 / 0.25.
At test time the class scores are averaged over the stages and the boxes come from the last.
torchvision has no cascade, so only the stage loop, the class-agnostic loss and the
post-processing of averaged scores are written here.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign, batched_nms, clip_boxes_to_image, remove_small_boxes

from detection.detectors.base import Detector, Parts
from detection.detectors.rcnn import mask_branch

STAGE_IOU_THRESHOLDS = (0.5, 0.6, 0.7)
STAGE_BOX_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
STAGE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)


def class_agnostic_predictor(in_features: int, num_classes: int) -> FastRCNNPredictor:
    """torchvision's box predictor with one box per RoI: ``cls_score`` (K+1), ``bbox_pred`` (4)."""
    predictor = FastRCNNPredictor(in_features, num_classes)
    predictor.bbox_pred = nn.Linear(in_features, 4)
    return predictor


def class_agnostic_loss(
    class_logits: Tensor, box_regression: Tensor, labels: Tensor, regression_targets: Tensor
) -> tuple[Tensor, Tensor]:
    """torchvision's ``fastrcnn_loss`` for a class-agnostic regressor.

    ``class_logits`` (N, K+1), ``box_regression`` (N, 4), ``labels`` (N,) with 0 = background,
    ``regression_targets`` (N, 4). Cross-entropy over all sampled RoIs; smooth L1 (beta 1/9,
    torchvision's, as our Faster R-CNN) over the positives, divided by the number of RoIs.
    """
    cls_loss = F.cross_entropy(class_logits, labels)
    pos = torch.where(labels > 0)[0]
    box_loss = F.smooth_l1_loss(box_regression[pos], regression_targets[pos], beta=1 / 9, reduction="sum")
    return cls_loss, box_loss / max(1, labels.numel())


class CascadeRoIHeads(nn.Module):
    """Three (or more) box stages on shared RoI features, plus an optional mask head on the last.

    Args:
        stages: one torchvision ``RoIHeads`` per stage (box pooler, 2-FC head, class-agnostic
            predictor, matcher at the stage's IoU, sampler, box coder with the stage's weights).
        loss_weights: one weight per stage (1, 0.5, 0.25).
        score_thresh, nms_thresh, detections_per_img: post-processing of the averaged scores.
        mask_roi_pool, mask_head, mask_predictor: Mask R-CNN's mask branch, attached to the last
            stage (trained on its positive RoIs, run on the final detections), or all ``None``.

    ``forward(features, proposals, image_shapes, targets)`` has ``RoIHeads``' contract: features
    an OrderedDict of (B, C, H, W) levels, proposals a list of (P_i, 4) XYXY boxes; returns
    (detections, losses) with detections per image ``boxes`` (N, 4), ``labels`` (N,) in 1..K,
    ``scores`` (N,) (and ``masks`` (N, 1, 28, 28) probabilities) in eval, losses in training.
    """

    def __init__(
        self,
        stages: list[RoIHeads],
        loss_weights: list[float],
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        mask_roi_pool: nn.Module | None = None,
        mask_head: nn.Module | None = None,
        mask_predictor: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if len(stages) != len(loss_weights):
            raise ValueError(f"{len(stages)} cascade stages but {len(loss_weights)} stage loss weights")
        self.stages = nn.ModuleList(stages)
        self.loss_weights = [float(w) for w in loss_weights]
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.mask_roi_pool = mask_roi_pool
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor

    @property
    def has_mask(self) -> bool:
        return self.mask_predictor is not None

    def run_stage(
        self, t: int, features: OrderedDict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Stage ``t`` on ``boxes``: (class logits (N, K+1), deltas (N, 4), refined boxes per image, detached)."""
        stage = self.stages[t]
        x = stage.box_head(stage.box_roi_pool(features, boxes, image_shapes))
        logits, deltas = stage.box_predictor(x)
        decoded = stage.box_coder.decode(deltas.detach(), boxes).reshape(-1, 4)
        refined = [
            clip_boxes_to_image(b, shape)
            for b, shape in zip(decoded.split([len(b) for b in boxes]), image_shapes)
        ]
        return logits, deltas, refined

    def forward(
        self,
        features: OrderedDict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        losses: dict[str, Tensor] = {}
        boxes = proposals
        probs: list[Tensor] = []
        for t, stage in enumerate(self.stages):
            if self.training:
                # re-match the previous stage's boxes at this stage's IoU and re-sample them
                # (gt boxes are appended as proposals in every stage, as MMDetection's sampler does)
                boxes, matched_idxs, labels, reg_targets = stage.select_training_samples(boxes, targets)
            logits, deltas, refined = self.run_stage(t, features, boxes, image_shapes)
            if self.training:
                cls_loss, box_loss = class_agnostic_loss(logits, deltas, torch.cat(labels), torch.cat(reg_targets))
                losses[f"loss_classifier_s{t}"] = self.loss_weights[t] * cls_loss
                losses[f"loss_box_reg_s{t}"] = self.loss_weights[t] * box_loss
                if t == len(self.stages) - 1 and self.has_mask:
                    losses["loss_mask"] = self.mask_loss(features, boxes, image_shapes, targets, matched_idxs, labels)
            else:
                probs.append(F.softmax(logits, -1))
            if t < len(self.stages) - 1:
                boxes = refined
        if self.training:
            return [], losses
        # Averaged softmax scores (Detectron2's choice; MMDetection averages logits): each stage
        # scores its own input boxes, the last stage's regression gives the final boxes.
        result = self.postprocess(torch.stack(probs).mean(0), refined)
        if self.has_mask:
            self.mask_inference(features, result, image_shapes)
        return result, losses

    def postprocess(self, scores: Tensor, boxes: list[Tensor]) -> list[dict[str, Tensor]]:
        """Per image: every (box, class) pair above ``score_thresh``, class-wise NMS, top detections.

        ``scores`` (N, K+1) with column 0 = background, ``boxes`` per image (N_i, 4), one box per
        RoI shared by all classes (class-agnostic regression), already clipped to its image.
        """
        out = []
        num_classes = scores.shape[1]
        for s, b in zip(scores.split([len(b) for b in boxes]), boxes):
            s = s[:, 1:]
            labels = torch.arange(1, num_classes, device=s.device).expand_as(s).reshape(-1)
            b = b[:, None, :].expand(-1, num_classes - 1, 4).reshape(-1, 4)
            s = s.reshape(-1)
            keep = torch.where(s > self.score_thresh)[0]
            b, s, labels = b[keep], s[keep], labels[keep]
            keep = remove_small_boxes(b, 1e-2)
            b, s, labels = b[keep], s[keep], labels[keep]
            keep = batched_nms(b, s, labels, self.nms_thresh)[: self.detections_per_img]
            out.append({"boxes": b[keep], "scores": s[keep], "labels": labels[keep]})
        return out

    def mask_loss(self, features, boxes, image_shapes, targets, matched_idxs, labels) -> Tensor:
        """Mask R-CNN's loss on the last stage's positive sampled RoIs (torchvision's maskrcnn_loss)."""
        pos = [torch.where(lab > 0)[0] for lab in labels]
        pos_boxes = [b[p] for b, p in zip(boxes, pos)]
        x = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, pos_boxes, image_shapes)))
        return maskrcnn_loss(
            x, pos_boxes, [t["masks"] for t in targets], [t["labels"] for t in targets],
            [m[p] for m, p in zip(matched_idxs, pos)],
        )

    def mask_inference(self, features, result: list[dict[str, Tensor]], image_shapes) -> None:
        """Adds ``masks`` (N, 1, 28, 28) probabilities of each detection's class to ``result``."""
        boxes = [r["boxes"] for r in result]
        x = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))
        for r, m in zip(result, maskrcnn_inference(x, [r["labels"] for r in result])):
            r["masks"] = m


def cascade_stages(
    parts: Parts,
    iou_thresholds: list[float],
    box_weights: list[list[float]],
    batch_size_per_image: int = 512,
    positive_fraction: float = 0.25,
) -> list[RoIHeads]:
    """One torchvision ``RoIHeads`` per stage; its own post-processing is unused (see CascadeRoIHeads)."""
    c = parts.channels
    pool = MultiScaleRoIAlign(parts.body_levels, 7, 2)  # no parameters: shared by the stages
    return [
        RoIHeads(
            pool, TwoMLPHead(c * 7 * 7, 1024), class_agnostic_predictor(1024, parts.num_classes + 1),
            fg_iou_thresh=iou, bg_iou_thresh=iou, batch_size_per_image=batch_size_per_image,
            positive_fraction=positive_fraction, bbox_reg_weights=tuple(w), score_thresh=parts.score_thresh,
            nms_thresh=parts.nms_thresh, detections_per_img=parts.detections_per_img,
        )
        for iou, w in zip(iou_thresholds, box_weights)
    ]


def rpn_of(parts: Parts) -> RegionProposalNetwork:
    """Faster R-CNN's RPN with torchvision's ``FasterRCNN`` defaults, as our ``faster_rcnn`` has it."""
    anchors = parts.anchors()
    return RegionProposalNetwork(
        anchors, RPNHead(parts.channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
        pre_nms_top_n=dict(training=2000, testing=1000), post_nms_top_n=dict(training=2000, testing=1000),
        nms_thresh=0.7, score_thresh=0.0,
    )


def build(
    parts: Parts,
    with_masks: bool = False,
    stage_iou_thresholds: list[float] = STAGE_IOU_THRESHOLDS,
    stage_box_weights: list[list[float]] = STAGE_BOX_WEIGHTS,
    stage_loss_weights: list[float] = STAGE_LOSS_WEIGHTS,
) -> Detector:
    """Cascade R-CNN, or Cascade Mask R-CNN with ``with_masks`` (Mask R-CNN's mask head on the last
    stage, as SRF-GAN Table 2 attaches it); one entry per stage in each list (defaults: the paper's 3).
    """
    n = len(stage_iou_thresholds)
    if n < 1 or len(stage_box_weights) != n or len(stage_loss_weights) != n:
        raise ValueError(
            f"detector.stage_iou_thresholds ({n}), detector.stage_box_weights ({len(stage_box_weights)}) and "
            f"detector.stage_loss_weights ({len(stage_loss_weights)}) must have one entry per stage"
        )
    for w in stage_box_weights:
        if len(w) != 4:
            raise ValueError(f"detector.stage_box_weights: {list(w)} must be 4 weights (wx, wy, ww, wh)")
    for iou in stage_iou_thresholds:
        if not 0.0 < iou < 1.0:
            raise ValueError(f"detector.stage_iou_thresholds: {iou} must be in (0, 1)")
    mask = mask_branch(parts) if with_masks else {}
    roi_heads = CascadeRoIHeads(
        cascade_stages(parts, stage_iou_thresholds, stage_box_weights), stage_loss_weights,
        score_thresh=parts.score_thresh, nms_thresh=parts.nms_thresh, detections_per_img=parts.detections_per_img,
        **mask,
    )
    model = GeneralizedRCNN(parts.backbone, rpn_of(parts), roi_heads, parts.transform())
    return Detector(model, parts.name, parts.num_classes, label_offset=1, with_masks=with_masks)


__all__ = ["CascadeRoIHeads", "build", "class_agnostic_loss", "rpn_of"]
