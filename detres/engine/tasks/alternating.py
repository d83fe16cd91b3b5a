"""Ren et al.'s 4-step alternating training of Faster R-CNN (Appendix A's COCO "RPN step" / "Fast R-CNN step").

Faster R-CNN (NIPS 2015, Sec. 3.2) and py-faster-rcnn's ``train_faster_rcnn_alt_opt.py``:

1. **RPN** from the ImageNet model: trunk (conv1..conv4_x, minus the ``freeze_at`` layers) and RPN head.
2. **Fast R-CNN** from the ImageNet model (a second network), on the proposals of the frozen step-1
   network: trunk, conv5_x head and predictor.
3. **RPN** on the step-2 detector: its shared trunk is frozen entirely, only the RPN-specific layers
   (3x3 conv, objectness and box layers) train. The step-2 network never trained an RPN, so these
   start from their Gaussian initialisation, as in py-faster-rcnn (whose Fast R-CNN model has no RPN
   layers to initialise them from).
4. **Fast R-CNN** layers only (conv5_x head + predictor), trunk and RPN frozen, on the step-3 RPN's
   proposals. The result is one network whose trunk (the step-2 trunk) is shared by RPN and detector.

Each step is a run of the training loop (:mod:`detres.engine.train_loop`) over :class:`AlternatingStepTask`;
the model only offers the stage-wise passes (``FasterRCNN.rpn_losses``,
``propose``, ``detector_losses``). Differences from py-faster-rcnn, by design: proposals for steps 2
and 4 are computed on the fly for each training batch (the frozen proposal network runs on the same
resized / flipped images, with the RPN's *training* top-n: ``rpn.pre/post_nms_top_n_train``) instead
of being precomputed once per image at the test scale and stored (py-faster-rcnn: all boxes before
NMS, 2000 after); no proposal cache, exact for any augmentation, at the cost of one extra no-grad
trunk + RPN pass per image in step 2 (step 4 reuses the step's own, frozen, trunk features).

Each step has its own SGD (fresh momentum), LR schedule (``solver.steps`` scaled to the step's
length; warm-up restarts) and batch stream (seed ``seed + step``). See :func:`alternating_plan`.

Resume: ``last.pt`` records the step and the iteration within it (``alternating: {step, step_iter,
plan, backbone_weights}``), the model and the optimizer, and in step 2 also the frozen step-1
proposal network. It is written at the start of every step (a step boundary: the step restarts from
its initial weights) and every ``checkpoint_period`` iterations within a step (resumes mid-step with
its momentum, LR and batch position). The plan (iterations, batch sizes, LR drops per step) must be
unchanged on resume. After each step ``stepN_<name>.pt`` holds that step's network (a detector
checkpoint; steps 1-3 are intermediate networks, not finished detectors). Periodic evaluation
(``eval_period``, counted within the step) runs in step 4 only, the first complete detector.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from detres.engine.amp import scaler_state_into
from detres.engine.distributed import MethodCall
from detres.engine.hooks import EvalHook, default_hooks, progress_bar
from detres.engine.lr_schedule import LRSchedule
from detres.engine.optimizer import build_detection_optimizer, load_optimizer_state
from detres.engine.tasks.detection_run import DetectionRun, detection_sgd_step
from detres.engine.train_loop import Trainer, TrainTask
from detres.models.build import build_detector

__all__ = [
    "STEP_NAMES",
    "STEP_TRAINABLE",
    "AlternatingPlan",
    "AlternatingStepTask",
    "alternating_plan",
    "set_step_trainable",
    "train_alternating",
]

STEP_NAMES = ("step1_rpn", "step2_fast_rcnn", "step3_rpn", "step4_fast_rcnn")
# Top-level FasterRCNN children trained in each step (within them, freeze_at still holds).
STEP_TRAINABLE: tuple[tuple[str, ...], ...] = (("trunk", "rpn"), ("trunk", "roi_heads"), ("rpn",), ("roi_heads",))


@dataclass(frozen=True)
class AlternatingPlan:
    """Per step (4 entries each): iterations, images per batch and the LR-drop iterations."""

    iters: tuple[int, ...]
    images_per_batch: tuple[int, ...]
    lr_steps: tuple[tuple[int, ...], ...]

    def to_dict(self) -> dict[str, list]:
        return {k: [list(v) if isinstance(v, tuple) else v for v in vals] for k, vals in asdict(self).items()}


def _four_positive_ints(values: Any, name: str) -> tuple[int, ...]:
    if len(values) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"solver.{name} must list 4 positive integers (one per step) or be empty, got {values!r}")
    return tuple(int(v) for v in values)


def alternating_plan(solver: Mapping[str, Any]) -> AlternatingPlan:
    """The 4 steps' iterations, batch sizes and LR drops from the ``solver`` options.

    ``alternating_iters`` empty: every step runs ``max_iter`` iterations with the LR dropped at
    ``steps`` (Appendix A, COCO: "the RPN step and Fast R-CNN step are both trained for 240k
    iterations with a learning rate of 0.001 and then for 80k iterations with 0.0001", i.e.
    max_iter 320k, steps [240k]). Otherwise a step of n iterations drops the LR at
    round(s * n / max_iter) for each s in ``steps``. ``alternating_images_per_batch`` empty:
    ``images_per_batch`` in every step (Appendix A, COCO: [8, 16, 8, 16]).
    """
    max_iter = int(solver["max_iter"])
    if max_iter < 1:
        raise ValueError(f"solver.max_iter must be >= 1, got {max_iter}")
    iters = solver.get("alternating_iters") or [max_iter] * 4
    iters = _four_positive_ints(list(iters), "alternating_iters")
    ipb = solver.get("alternating_images_per_batch") or [int(solver["images_per_batch"])] * 4
    ipb = _four_positive_ints(list(ipb), "alternating_images_per_batch")
    drops = sorted(int(s) for s in solver["steps"])
    lr_steps = tuple(tuple(s if n == max_iter else int(round(s * n / max_iter)) for s in drops) for n in iters)
    return AlternatingPlan(iters=iters, images_per_batch=ipb, lr_steps=lr_steps)


def set_step_trainable(model: nn.Module, step: int, base_requires_grad: Mapping[str, bool]) -> None:
    """Let only step ``step``'s (0-based) modules train; ``base_requires_grad`` = a freshly built model's
    flags (so ``freeze_at`` layers stay frozen in the steps that train the trunk)."""
    trainable = STEP_TRAINABLE[step]
    for name, param in model.named_parameters():
        param.requires_grad_(name.split(".", 1)[0] in trainable and base_requires_grad.get(name, True))


def _set_step_modes(model: nn.Module, step: int) -> None:
    """Training mode, with the frozen parts of steps 3-4 in eval mode (their statistics stay put)."""
    model.train()
    if step >= 2:
        model.trunk.eval()
    if step == 3:
        model.rpn.eval()


def _frozen_copy(model: nn.Module) -> nn.Module:
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


class AlternatingStepTask(TrainTask):
    """Step ``index`` (0-based) of the 4: its loss pass (the RPN's, or Fast R-CNN's on the proposals of
    ``proposal_net`` in step 2 and of the model's own frozen RPN in step 4) on the step's own batch stream (its
    batch size, seed ``seed + index``). ``last.pt`` records the step and the iteration within it."""

    def __init__(
        self,
        run: DetectionRun,
        index: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        plan: AlternatingPlan,
        backbone_weights: str | None,
        proposal_net: nn.Module | None,
    ) -> None:
        self.run, self.index, self.model, self.optimizer = run, index, model, optimizer
        self.plan, self.backbone_weights = plan, backbone_weights
        self.proposal_net = proposal_net

    def batches(self, start_iter: int) -> Iterator[Any]:
        batch_size = self.plan.images_per_batch[self.index]
        return iter(self.run.loader(start_iter, images_per_batch=batch_size, seed=int(self.run.cfg.seed) + self.index))

    def step(self, trainer: Trainer, batch: dict[str, Any]) -> dict[str, float]:
        run, losses_of = self.run, trainer.train_model  # the model's loss methods, through DDP under torchrun
        images, targets, sizes = batch["images"].to(run.device), batch["targets"], batch["image_sizes"]
        with run.amp.autocast():
            if self.index in (0, 2):
                losses = losses_of("rpn_losses", images, targets, sizes)
            elif self.index == 1:
                proposals = self.proposal_net.propose(images, sizes, mode="train")
                losses = losses_of("detector_losses", images, targets, sizes, proposals=proposals)
            else:
                losses = losses_of("detector_losses", images, targets, sizes)  # its own frozen RPN's proposals
        return detection_sgd_step(losses, self.optimizer, run.amp, iteration=trainer.global_iter)

    def checkpoint_payload(self, trainer: Trainer) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "alternating": {
                "step": self.index,
                "step_iter": trainer.iter,
                "plan": self.plan.to_dict(),
                "backbone_weights": self.backbone_weights,
            }
        }
        if self.index == 1:
            extra["proposal_model"] = self.proposal_net.state_dict()
        payload = self.run.payload(self.model, trainer.global_iter, **extra)
        if trainer.iter > 0:  # at a step boundary the step restarts from its initial weights: no momentum yet
            payload["optimizer"] = self.optimizer.state_dict()
            scaler_state_into(payload, self.run.amp)
        return payload

    def train_mode(self) -> None:
        _set_step_modes(self.model, self.index)

    def train_record(self, trainer: Trainer, means: Mapping[str, float]) -> dict[str, Any]:
        return {
            "iter": trainer.global_iter,
            "step": self.index + 1,
            "step_iter": trainer.iter,
            "lr": trainer.lr,
            "time": trainer.elapsed(),
            **means,
        }


def _resume_point(run: DetectionRun, plan: AlternatingPlan, state: dict | None) -> tuple[int, int, str | None]:
    """(step, iteration within it, the backbone file the step-1/2 networks start from) to start from."""
    if state is None:
        return 0, 0, run.cfg.model.weights
    alt = state.get("alternating")
    if not isinstance(alt, dict):
        raise ValueError(f"{run.last_path}: no 'alternating' record; not an alternating-training checkpoint")
    if alt["plan"] != plan.to_dict():
        raise ValueError(
            f"{run.last_path}: written with the alternating plan {alt['plan']}, but the config now "
            f"gives {plan.to_dict()}; resume with the same solver options"
        )
    return int(alt["step"]), int(alt["step_iter"]), alt["backbone_weights"]


def _step_trainer(
    run: DetectionRun, task: AlternatingStepTask, schedule: LRSchedule, progress, *, start_iter: int
) -> Trainer:
    solver, plan, index = run.cfg.solver, task.plan, task.index
    evaluation = None
    if index == 3:  # only the step-4 network is a complete detector
        evaluation = EvalHook(partial(run.evaluate, task.model), run.logger, period=solver.eval_period, at_end=False)
    return Trainer(
        task,
        max_iter=plan.iters[index],
        start_iter=start_iter,
        iteration_offset=sum(plan.iters[:index]),
        checkpoints=run.checkpoints,
        device=run.device,
        started=run.started,
        # the step's loss methods run inside DDP (built after the step's requires_grad flags are set)
        train_module=MethodCall(task.model),
        find_unused_parameters=True,
        hooks=default_hooks(
            schedule,
            task.optimizer,
            run.logger,
            log_period=solver.log_period,
            checkpoint_period=solver.checkpoint_period,
            progress=progress,
            eval_hook=evaluation,
        ),
    )


def train_alternating(run: DetectionRun, state: dict | None) -> tuple[nn.Module, int]:
    """Run the 4 steps (resuming from ``state`` = a ``last.pt`` dict, if given); returns
    (final network, total iterations)."""
    device, solver = run.device, run.cfg.solver
    plan = alternating_plan(solver)
    step0, step_iter0, backbone_weights = _resume_point(run, plan, state)

    def build(*, from_backbone: bool) -> nn.Module:
        """The config's network: from the ImageNet backbone (steps 1 and 2), or for a state_dict to fill."""
        model_cfg = dict(run.cfg.model, weights=backbone_weights)
        num_classes = len(run.meta["class_names"])
        return build_detector(
            model_cfg, input_cfg=run.cfg.input, num_classes=num_classes, load_weights=from_backbone
        ).to(device)

    base_flags: dict[str, bool] | None = None
    model: nn.Module | None = None
    proposal_net: nn.Module | None = None
    iteration = sum(plan.iters[:step0]) + step_iter0
    with progress_bar("train_det (4-step)", total=sum(plan.iters), initial=iteration) as progress:
        for step in range(step0, 4):
            resumed = state is not None and step == step0
            if resumed:
                model = build(from_backbone=False)
                model.load_state_dict(state["model"])
                if step == 1:
                    proposal_net = build(from_backbone=False)
                    proposal_net.load_state_dict(state["proposal_model"])
                    proposal_net = _frozen_copy(proposal_net)
            elif step in (0, 1):
                # Step 1 and step 2 both start from the ImageNet model; step 2 proposes with step 1's network.
                proposal_net = _frozen_copy(model) if step == 1 else None
                model = build(from_backbone=True)
            # Steps 3 and 4 continue with the network of the previous step.
            if base_flags is None:  # the first network of this call is freshly built: its flags are freeze_at's
                base_flags = {name: p.requires_grad for name, p in model.named_parameters()}
            set_step_trainable(model, step, base_flags)
            _set_step_modes(model, step)
            optimizer = build_detection_optimizer(model, solver, modules=STEP_TRAINABLE[step])
            schedule = LRSchedule(
                optimizer,
                base_lr=solver.base_lr,
                mode="step",
                steps=plan.lr_steps[step],
                gamma=solver.gamma,
                warmup_iters=solver.warmup_iters,
                warmup_lr=solver.warmup_lr,
            )
            step_iter = step_iter0 if resumed else 0
            if resumed and step_iter > 0:
                load_optimizer_state(optimizer, state["optimizer"], run.last_path)
            task = AlternatingStepTask(
                run,
                step,
                model,
                optimizer,
                plan=plan,
                backbone_weights=backbone_weights,
                proposal_net=proposal_net,
            )
            trainer = _step_trainer(run, task, schedule, progress, start_iter=step_iter)
            if step_iter == 0:
                trainer.save_last()  # step boundary
            step_started = time.time()
            trainer.run()
            iteration = trainer.global_iter
            seconds = round(time.time() - step_started, 1)
            payload = run.payload(model, iteration, alternating={"step": step, "seconds": seconds})
            run.save_file(run.out / f"{STEP_NAMES[step]}.pt", payload, iteration)
            if step == 1:
                proposal_net = task.proposal_net = None  # the step-1 network is no longer needed
    for name, param in model.named_parameters():  # back to the freshly built state (freeze_at only)
        param.requires_grad_(base_flags.get(name, True))
    model.train()
    return model, iteration
