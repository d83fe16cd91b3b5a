"""Default options of ``task: loc`` (ResNet paper, Appendix C: ImageNet localization), the paper's values where it gives
them."""

from __future__ import annotations

LOC_DEFAULTS: dict = {
    "task": "loc",
    "seed": 0,
    "output_dir": "runs/loc",
    "device": "auto",
    "model": {
        "depth": 101,  # Appendix C: ResNet-101
        "weights": None,  # local train_cls checkpoint of an ImageNet ResNet (model_final.pt: BN recomputed)
        "base_width": 64,  # must match the checkpoint
        "stride_in_1x1": False,  # must match the checkpoint
        "allow_unrecomputed_bn": False,  # accept a train_cls checkpoint whose BN statistics were not recomputed
        "freeze_at": 2,  # as the detector: conv1 and conv2_x frozen, BN frozen throughout
        "anchor_sizes": [64, 128, 256],  # not given in the paper; on 224 crops, objects are mostly 64..224 px
        "aspect_ratios": [0.5, 1.0, 2.0],
        "rpn": {
            "fg_iou_thresh": 0.7,
            "bg_iou_thresh": 0.3,
            "batch_size_per_image": 8,  # "8 anchors are randomly sampled for each image"
            "positive_fraction": 0.5,  # "positive and negative anchors have a ratio of 1:1"
            "pre_nms_top_n_test": 6000,
            "nms_thresh": 0.7,
            "allowed_border": -1,  # keep cross-boundary anchors (objects fill much of a crop)
        },
        "rcnn": {  # the R-CNN stage (detres/models/localization/rcnn_localizer.py)
            "crop_size": 224,  # "warped to 224 x 224 pixels"
            "context_padding": 0,  # warped pixels of context around a proposal (R-CNN's p; not given here)
            # "image": crop regions from the image at its own resolution (RoI-centric: the point of the stage);
            # "view": from the RPN's test view (shorter side test.scale)
            "crop_source": "image",
            "fg_iou_thresh": 0.5,  # R-CNN / Fast R-CNN: IoU >= 0.5 with a gt box of the class = that class
            "bbox_reg_weights": [10.0, 10.0, 5.0, 5.0],
            "smooth_l1_beta": 1.0,
            # training (tools/train_loc.py --stage rcnn)
            "rpn_checkpoint": None,  # the RPN stage's model_final.pt: its proposals are the training samples
            "proposals_per_class": 200,  # "the highest scored 200 proposals" per image (of its gt class)
            "regions_per_batch": 256,  # "a mini-batch size of 256 in the RoI-centric fashion"
            "fg_fraction": None,  # None: regions drawn uniformly; a number caps the foreground share
        },
    },
    "data": {
        # "ilsvrc": root/{Annotations,Data}/{train,val} + LOC_synset_mapping.txt; "tiny_imagenet": the
        # tiny-imagenet-200 folder (train/<wnid>/<wnid>_boxes.txt, val/val_annotations.txt, wnids.txt)
        "format": "ilsvrc",
        "root": "data_toy/loc",
        "train_split": "train",
        "val_split": "val",
        "synsets": None,  # ilsvrc: synset list (None = root/LOC_synset_mapping.txt)
        "max_val_images": None,  # None = all; an int scores the first n (quick checks)
        "num_workers": 2,
        # a bad sample (unreadable or missing image, malformed annotation or box, annotation on an unknown image):
        # "error" stops before training with a one-line message naming the file and field; "skip" drops it, counts
        # it, logs one summary line and lists (file, reason) in <output_dir>/skipped_samples.json
        "on_bad_sample": "error",
    },
    "input": {
        "scale_min": 256,  # classification scale augmentation: shorter side ~ U[256, 480]
        "scale_max": 480,
        "crop": 224,
        "flip_prob": 0.5,
    },
    "solver": {
        "images_per_batch": 256,  # "mini-batches of 256 images"
        "base_lr": 0.001,
        "momentum": 0.9,
        "weight_decay": 0.0001,
        "bias_lr_factor": 2.0,
        "weight_decay_bias": 0.0,
        "max_iter": 80000,
        "steps": [60000],
        "gamma": 0.1,
        "warmup_iters": 0,
        "warmup_lr": 0.0001,
        "checkpoint_period": 2000,
        # besides last.pt, keep the last N saves as checkpoints/iter_<iteration>.pt (for --resume-from, and the
        # good state last.pt is set back to when training diverges); 0 = last.pt only
        "keep_checkpoints": 3,
        "log_period": 20,
        # mixed precision (CUDA only): forward + loss under torch.autocast, float16 with a GradScaler (its state is
        # saved in last.pt); on a CPU device it warns once and trains in fp32 (bf16 matmuls crash some CPUs)
        "amp": False,
        "amp_dtype": "float16",  # "float16" or "bfloat16" (no loss scaling needed)
    },
    "test": {
        "scale": 256,  # dense: whole image at this shorter side; 1crop: centre `input.crop` crop of it
        "scales": [],  # dense at several shorter sides (best-scoring box over scales); [] = [scale]
        "top_n": 200,  # boxes per class kept after NMS (the R-CNN stage's proposals)
        "nms_thresh": 0.7,
        "box_mode": "best",  # "best": the top box; "average": score-weighted mean of the top `average_top` boxes
        "average_top": 10,
        "classifier": None,  # train_cls checkpoint predicting the classes (top-5); None = ground-truth rows only
        "classifier_mode": "1crop",  # "1crop" or "dense" (the checkpoint's multi-scale dense test)
        # R-CNN stage: a box's score is the R-CNN's class probability ("rcnn", the paper) or that times the
        # RPN's score ("product")
        "rcnn_score_fusion": "rcnn",
    },
}
