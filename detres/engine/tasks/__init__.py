"""The training tasks of the one training loop (:mod:`detres.engine.train_loop`): classification, detection (joint
and 4-step alternating) and the localizer's RPN and R-CNN stages; each module's ``train_*`` function runs a whole
training run of its task."""
