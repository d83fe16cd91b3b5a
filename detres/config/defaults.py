"""Every configuration option of detres, one commented tree per task, with the papers' values as defaults.

A YAML config names its ``task`` and overrides only what differs; unknown keys are errors.
Small-data configs (shapes world, CIFAR-10, BCCD) change sizes and schedules, never the algorithm.
"""

from __future__ import annotations

import copy

# ---------------------------------------------------------------------------------------------
# Classification pre-training (ResNet paper Sec. 3.4, AlexNet Sec. 4-5)
# ---------------------------------------------------------------------------------------------
CLS_DEFAULTS: dict = {
    "task": "cls",
    "seed": 0,
    "output_dir": "runs/cls",
    "device": "auto",  # "auto" = cuda if available else cpu
    "model": {
        # "imagenet" (Table 1 nets), "cifar" (6n+2 nets of Sec. 4.2), "vgg16" (VGG configuration D) or
        # "alexnet" (Krizhevsky et al. 2012); vgg16/alexnet have no BN: set bn_recompute.enabled=false
        "arch": "imagenet",
        "depth": 50,  # 18/34/50/101/152 (imagenet) or 20/32/44/56/110/1202 (cifar); ignored by vgg16/alexnet
        "shortcut": "B",  # A: zero-padded identity, B: projection on shape change, C: all projections
        "plain": False,  # plain counterpart (no shortcuts) for the paper's plain-vs-residual study
        "stride_in_1x1": False,  # True: stride in the first 1x1 (original MSRA); False: in the 3x3
        "base_width": 64,  # channels of conv1/conv2_x (Table 1: 64); smaller = same net, cheaper (CPU runs)
        "zero_init_residual": False,
        "dropout": 0.5,  # vgg16/alexnet: dropout after fc6 and fc7 (AlexNet Sec. 4.2)
        "batch_norm": False,  # vgg16: BN after every conv (torchvision's vgg16_bn; not in the paper)
        "vgg_width": 64,  # vgg16: conv1 channels; all convs scale with it (64/128/256/512/512 at 64)
        "vgg_hidden": 4096,  # vgg16: size of fc6 and fc7
        "groups": 1,  # alexnet: 1 = single-GPU form; 2 = the paper's two-GPU grouped conv2/conv4/conv5
        "weights": None,  # local path to initialise from (our checkpoint or a torchvision state_dict)
    },
    "data": {
        "train_dir": "data_toy/cls/train",  # ImageFolder: <dir>/<class>/*.png|jpg
        "val_dir": "data_toy/cls/val",  # ImageFolder like train_dir, or a flat image folder with val_labels
        "val_labels": None,  # labels file for a flat val_dir: "<file> <class name> [ignored columns...]"
        # per line (Tiny-ImageNet val_annotations.txt; ImageNet val as "<file> <wnid>"); classes not in
        # train_dir are skipped and counted (reported once); None = val_dir is an ImageFolder
        "num_workers": 2,
        "mean_mode": "per_pixel",  # AlexNet: subtract the per-pixel mean image; or "per_channel"
        "mean": None,  # fixed per-channel RGB mean (0..255); None = computed over the training set
        "std": None,  # per-channel RGB std to divide by; None = no division (the papers)
        "stats_max_images": None,  # cap on images used for mean / PCA statistics (None = all)
        # a bad sample (unreadable or missing image, malformed annotation or box, annotation on an unknown image):
        # "error" stops before training with a one-line message naming the file and field; "skip" drops it, counts
        # it, logs one summary line and lists (file, reason) in <output_dir>/skipped_samples.json
        "on_bad_sample": "error",
    },
    "augment": {
        "mode": "imagenet",  # "imagenet": scale aug + crop + flip; "cifar": pad 4, crop, flip (Sec. 4.2)
        "scale_min": 256,  # shorter side drawn uniformly from [scale_min, scale_max] (Sec. 3.4)
        "scale_max": 480,
        "crop": 224,
        "flip": True,
        "color_pca": True,  # AlexNet Sec. 4.1 PCA colour noise
        "pca_alphastd": 0.1,  # alpha ~ N(0, 0.1), drawn once per image per epoch
        "cifar_pad": 4,
    },
    "solver": {
        "batch_size": 256,  # the global batch under torchrun: each of N processes trains on batch_size / N
        "base_lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 0.0001,
        "max_iter": 600000,  # the paper trains for up to 60e4 iterations
        "lr_schedule": "plateau",  # "plateau": divide by 10 when val error plateaus; "step": at `steps`
        "steps": [],  # iterations at which the LR is multiplied by gamma (step schedule)
        "gamma": 0.1,
        "plateau_patience": 2,  # evaluations without improvement before the LR drops
        "plateau_threshold": 0.001,  # minimum decrease of val top-1 error that counts as improvement
        # no plateau drop sooner than this many epochs (epoch = train images // batch_size iterations)
        # after the start or the previous drop; 0 = no minimum. ImageNet configs: 10 (paper drops ~30/60)
        "plateau_min_epochs": 0.0,
        "min_lr": 0.0,  # never go below this (plateau schedule); 0 = no floor
        "warmup_iters": 0,  # ResNet-110 (Sec. 4.2) warms up at 0.01 for 400 iterations
        "warmup_lr": 0.01,
        "eval_period": 1000,  # iterations between validation runs (also drives the plateau rule)
        "checkpoint_period": 1000,
        # besides last.pt, keep the last N saves as checkpoints/iter_<iteration>.pt (for --resume-from, and the
        # good state last.pt is set back to when training diverges); 0 = last.pt only
        "keep_checkpoints": 3,
        "log_period": 20,
        # mixed precision (CUDA only): forward + loss under torch.autocast, float16 with a GradScaler (its state is
        # saved in last.pt); on a CPU device it warns once and trains in fp32 (bf16 matmuls crash some CPUs)
        "amp": False,
        "amp_dtype": "float16",  # "float16" or "bfloat16" (no loss scaling needed)
        # under torchrun (batch_size is the global batch, split over the ranks): BatchNorm statistics over the
        # whole global batch (SyncBatchNorm) instead of each rank's share; no effect in a single process
        "sync_bn": False,
    },
    "test": {
        "resize": 256,  # 1-crop / 10-crop: shorter side resized to this, then crop `augment.crop`
        "scales": [224, 256, 384, 480, 640],  # dense fully-convolutional multi-scale testing
        "modes": ["1crop", "10crop", "multiscale"],
        "batch_size": 64,
    },
    "bn_recompute": {
        "enabled": True,  # Appendix A: precise BN statistics over the training set, then frozen
        "max_images": None,  # None = the whole training set
        "batch_size": 64,
    },
}

# ---------------------------------------------------------------------------------------------
# Faster R-CNN on a ResNet C4 (or VGG-16) backbone (ResNet paper Appendix A; Ren et al. hyper-parameters)
# ---------------------------------------------------------------------------------------------
DET_DEFAULTS: dict = {
    "task": "det",
    "seed": 0,
    "output_dir": "runs/det",
    "device": "auto",
    "model": {
        # "resnet": ResNet-C4 (Appendix A: conv1..conv4_x shared, conv5_x per region, pooler 14x14);
        # "vgg16": the VGG-16 baseline of Tables 7-8 (Faster R-CNN: conv1_1..conv5_3 shared, fc6/fc7 per
        # region; needs roi_heads.pooler_resolution=7 and a train_cls model.arch=vgg16 checkpoint or a
        # torchvision vgg16 state_dict; depth/stride_in_1x1/base_width are then ignored)
        "backbone": "resnet",
        "depth": 101,  # ResNet-50/101 in the paper; any ImageNet depth works
        "weights": None,  # local path: a train_cls checkpoint (BN recomputed) or a torchvision state_dict
        "stride_in_1x1": False,  # must match how the backbone checkpoint was trained
        "base_width": 64,  # must match the backbone checkpoint (Table 1: 64)
        "vgg_width": 64,  # vgg16: conv1 channels, must match the checkpoint's model_args width (paper: 64)
        "vgg_hidden": 4096,  # vgg16: fc6/fc7 size, must match the checkpoint's model_args hidden (paper: 4096)
        # resnet: 0 train all; 1 freeze conv1; 2 freeze conv1 + res2 (conv2_x).
        # vgg16: 0 train all; 1 freeze conv1_x; 2 freeze conv1_x + conv2_x (the first 4 convs, Faster R-CNN)
        "freeze_at": 2,
        # Appendix A freezes BN statistics *recomputed* on the training set: a train_cls checkpoint recording
        # bn_recomputed=False (e.g. last.pt) is refused unless this is true; files recording nothing
        # (torchvision state_dicts) are accepted with a warning
        "allow_unrecomputed_bn": False,
        # RGB 0..255; None = what model.weights was trained with (a train_cls checkpoint's channel mean and std, or
        # [1, 1, 1] when it divided by none); torchvision's ImageNet mean / std for other files and random init
        "pixel_mean": None,
        "pixel_std": None,
        "anchor_sizes": [128, 256, 512],  # VOC; COCO adds 64
        "aspect_ratios": [0.5, 1.0, 2.0],
        "rpn": {
            "fg_iou_thresh": 0.7,
            "bg_iou_thresh": 0.3,
            "batch_size_per_image": 256,
            "positive_fraction": 0.5,
            "pre_nms_top_n_train": 12000,
            "post_nms_top_n_train": 2000,
            "pre_nms_top_n_test": 6000,
            "post_nms_top_n_test": 300,
            "nms_thresh": 0.7,
            "min_size": 0.0,  # proposals smaller than this (input pixels) are removed
            "allowed_border": 0,  # cross-boundary anchors are ignored in training; -1 keeps them
            # anchors more than this fraction inside a crowd region (a target's optional crowd_boxes) are
            # ignored, not negatives (mmdetection's ignore_iof_thr); >= 1 turns it off
            "crowd_iof_thresh": 0.7,
        },
        "roi_heads": {
            "pooler_type": "roi_pool",  # "roi_pool" (the paper) or "roi_align"
            "pooler_resolution": 14,  # 14x14 RoI features -> conv5_x with stride 2 -> 7x7
            "sampling_ratio": 0,  # roi_align only
            "batch_size_per_image": 128,
            "positive_fraction": 0.25,
            "fg_iou_thresh": 0.5,
            "bg_iou_thresh_hi": 0.5,
            "bg_iou_thresh_lo": 0.1,  # background RoIs have IoU in [lo, hi): VOC 0.1; COCO 0.0 (Faster R-CNN Sec. 4.2)
            # proposals more than this fraction inside a crowd region are ignored (Detectron's
            # CROWD_FILTER_THRESH); >= 1 turns it off
            "crowd_iof_thresh": 0.7,
            "bbox_reg_weights": [10.0, 10.0, 5.0, 5.0],
            "score_thresh": 0.05,
            "nms_thresh": 0.3,  # the paper's per-class NMS threshold (soft_linear: its N_t)
            "detections_per_img": 100,
            # "nms" (hard per-class NMS, the paper), "soft_linear" (score *= 1 - IoU when IoU > nms_thresh) or
            # "soft_gaussian" (score *= exp(-IoU^2 / soft_nms_sigma)): soft-NMS of Bodla et al. 2017
            "nms_method": "nms",
            "soft_nms_sigma": 0.5,
            "soft_nms_score_thresh": 0.001,  # soft-NMS drops boxes whose decayed score is not above this
            # Appendix B box voting: each kept box becomes the score-weighted mean of the pre-NMS boxes of its
            # class with IoU >= box_voting_iou (scores unchanged)
            "box_voting": False,
            "box_voting_iou": 0.5,
            # Appendix B global context: the whole-image box RoI-pooled on conv4 and run through the same conv5
            # head; its vector is concatenated to every region's before the sibling layers (trained end-to-end)
            "global_context": False,
        },
    },
    "data": {
        "format": "coco",  # "coco" or "voc"
        "train_images": "data_toy/det/images",  # coco: image folder; voc: dataset root
        "train_ann": "data_toy/det/annotations/instances_train.json",  # coco: JSON; voc: image set name
        "val_images": "data_toy/det/images",
        "val_ann": "data_toy/det/annotations/instances_val.json",
        "class_names": [],  # voc: fixed class order; empty = sorted names found in the XMLs
        "use_difficult_in_training": False,
        "num_workers": 2,
        # a bad sample (unreadable or missing image, malformed annotation or box, annotation on an unknown image):
        # "error" stops before training with a one-line message naming the file and field; "skip" drops it, counts
        # it, logs one summary line and lists (file, reason) in <output_dir>/skipped_samples.json
        "on_bad_sample": "error",
    },
    "input": {
        "min_size_train": [600],  # shorter side s; several values = random choice per image
        "max_size_train": 1000,
        "min_size_test": 600,
        "max_size_test": 1000,
        "flip_prob": 0.5,
    },
    "solver": {
        "images_per_batch": 8,  # Appendix A (COCO): 8 images per mini-batch
        # (under torchrun the global batch: each of N processes trains on images_per_batch / N images)
        "base_lr": 0.001,
        "momentum": 0.9,
        # Ren et al.'s solver (py-faster-rcnn, whose hyper-parameters Appendix A keeps): weight decay 5e-4 on
        # weights; biases at 2x the LR and without decay. Frozen parameters are not optimised at all.
        "weight_decay": 0.0005,
        "bias_lr_factor": 2.0,  # LR of bias parameters = this x the scheduled LR (detectron2's default: 1)
        "weight_decay_bias": 0.0,  # weight decay of biases; None = weight_decay (detectron2's default)
        "max_iter": 320000,  # COCO: 240k at 0.001, then 80k at 0.0001
        "steps": [240000],
        "gamma": 0.1,
        "warmup_iters": 0,
        "warmup_lr": 0.0001,
        "eval_period": 20000,
        "checkpoint_period": 5000,
        # besides last.pt, keep the last N saves as checkpoints/iter_<iteration>.pt (for --resume-from, and the
        # good state last.pt is set back to when training diverges); 0 = last.pt only
        "keep_checkpoints": 3,
        "log_period": 20,
        "aspect_ratio_grouping": True,
        # "joint": approximate joint training of RPN + Fast R-CNN in one net (py-faster-rcnn end2end);
        # "alternating": Ren et al.'s 4-step training (Appendix A's COCO "RPN step" / "Fast R-CNN step"):
        # 1 RPN from ImageNet, 2 Fast R-CNN from ImageNet on step-1 proposals, 3 RPN layers only on the
        # frozen step-2 trunk, 4 Fast R-CNN layers (conv5 head + predictor) only on step-3 proposals
        "training_scheme": "joint",
        # iterations of the 4 steps; [] = max_iter each. `steps` (LR drops) are positions in a max_iter-long
        # step and scale with each step's length; warm-up, if any, restarts every step
        "alternating_iters": [],
        "alternating_images_per_batch": [],  # per step; [] = images_per_batch (Appendix A COCO: [8, 16, 8, 16])
        # mixed precision (CUDA only): forward + loss under torch.autocast, float16 with a GradScaler (its state is
        # saved in last.pt); on a CPU device it warns once and trains in fp32 (bf16 matmuls crash some CPUs)
        "amp": False,
        "amp_dtype": "float16",  # "float16" or "bfloat16" (no loss scaling needed)
    },
    "test": {
        # detection forward passes (evaluation, test_det, Predictor) under float16 CUDA autocast; detections are
        # returned as float32. Ignored (fp32) on CPU
        "amp": False,
        "iou_thresh_voc": 0.5,
        "use_07_metric": True,
        # library computing COCO AP: "pycocotools" (the reference) or "faster_coco_eval" (same AP within 1e-6,
        # 4.6x faster on 5k images / 35k detections; pip install -e '.[fast-eval]')
        "coco_backend": "pycocotools",
        "vis_images": 8,  # example detection PNGs written after evaluation
        "vis_score_thresh": 0.5,
        # Appendix-B box refinement: a second RoI pass on each proposal's regressed box, NMS on the union of
        # both passes' predictions, then box voting if model.roi_heads.box_voting (the paper uses both)
        "box_refinement": False,
        # Appendix-B multi-scale testing: conv features on an image pyramid (shorter sides; the longer side is
        # capped at scale * max_size_test / min_size_test); each RoI is pooled on the two adjacent levels that
        # bracket reference_size^2 (its area there) and the two region features are merged by maxout
        "multiscale": {
            "enabled": False,
            "scales": [200, 400, 600, 800, 1000],
            "reference_size": 224,  # the pre-training crop side (NoC / SPP-net level choice)
            "pyramid_proposals": False,  # also run the RPN on every level and merge (default: input scale only)
        },
        "flip": False,  # average scores and boxes with those of the horizontally mirrored image
        # Ensembles (several --checkpoint) and pyramid proposals: union of proposal sets, NMS, cap
        "ensemble": {
            "proposal_nms_thresh": None,  # None = the first model's RPN NMS threshold (0.7)
            "max_proposals": None,  # None = the first model's RPN post-NMS top-n at test time (300)
        },
    },
}


def defaults_for_task(task: str) -> dict:
    """A fresh, mutable copy of the default tree for ``task``."""
    from detres.config.loc_defaults import LOC_DEFAULTS

    trees = {"cls": CLS_DEFAULTS, "det": DET_DEFAULTS, "loc": LOC_DEFAULTS}
    if task not in trees:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(trees)}")
    return copy.deepcopy(trees[task])
