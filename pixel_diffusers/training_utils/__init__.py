"""What the training scripts share: data and buckets, losses, optimisation, checkpoints, logging and the Hub."""

from . import shapes
from .checkpointing import CheckpointManager, TrainingState
from .config import (
    add_common_training_args,
    image_grid,
    log_sample_grid,
    make_accelerator,
    parse_args,
    push_checkpoint,
    step_generator,
    training_config_yaml,
)
from .data import (
    AspectRatioBuckets,
    BucketBatchSampler,
    BucketedImageDataset,
    HFImageCaptionSource,
    ImageCaptionFolder,
    SampledBatches,
    StreamingBucketBatches,
    add_image_data_args,
    build_image_batches,
    collate,
    load_image_caption_dataset,
    preprocess_image,
)
from .loop import TrainingRun, save_final_outputs, train_loop
from .losses import DINOv3Features, FrequencyLoss, REPALoss, sample_flow_sigmas
from .optim import (
    AdaptiveGradClip,
    LossSpikeGuard,
    build_lr_scheduler,
    build_optimizer,
    halve_batch,
    run_with_oom_retry,
    stepped_cosine_restart_lambda,
)

__all__ = [
    "AdaptiveGradClip",
    "AspectRatioBuckets",
    "BucketBatchSampler",
    "BucketedImageDataset",
    "CheckpointManager",
    "DINOv3Features",
    "FrequencyLoss",
    "HFImageCaptionSource",
    "ImageCaptionFolder",
    "LossSpikeGuard",
    "REPALoss",
    "SampledBatches",
    "StreamingBucketBatches",
    "TrainingRun",
    "TrainingState",
    "add_common_training_args",
    "add_image_data_args",
    "build_image_batches",
    "build_lr_scheduler",
    "build_optimizer",
    "collate",
    "halve_batch",
    "image_grid",
    "load_image_caption_dataset",
    "log_sample_grid",
    "make_accelerator",
    "parse_args",
    "preprocess_image",
    "push_checkpoint",
    "run_with_oom_retry",
    "sample_flow_sigmas",
    "save_final_outputs",
    "shapes",
    "step_generator",
    "stepped_cosine_restart_lambda",
    "train_loop",
    "training_config_yaml",
]
