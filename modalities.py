"""The modalities: every fact the code needs about one modality, in one record (docs/method.md section 8).

A `Modality` says how a file of that modality is read, how the raw signal becomes the tensor its
tokenizer takes, which tokenizer that is and how its settings follow from the input shape, the
caption templates, and how the synthetic world generates it. Everything else is derived from
`MODALITIES`: the list of extended modalities, the prompts, the readers, the tokenizers. Adding a
modality is one `register(name, Modality(...))`.

`sizes` is the dict of input sizes of a run (data.sizes_of; DEFAULT_SIZES without a run):
image_size, frames, audio_seconds, points, point_channels, point_groups, point_neighbours,
imu_length, eeg_channels, eeg_length, series_kernel, depth_format (how a 16-bit depth PNG stores
depth: readers.read_depth_metres), and seed (the resampling seed of point clouds).
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch

import preprocess
import readers
import tokenizers
import world


# The input sizes of a run (train.py's defaults); each modality below says which of them it uses.
DEFAULT_SIZES = dict(image_size=32, frames=4, audio_seconds=0.5, points=256, point_channels=3, point_groups=32,
                     point_neighbours=16, imu_length=128, eeg_channels=16, eeg_length=128, series_kernel=8, seed=0,
                     depth_format="mm")


@dataclass(frozen=True)
class Modality:
    """One modality.

    read(path, sizes) -> the raw signal a file holds (RGB image, frames, depth in metres, 16 kHz
        waveform, (N, C) points, a 2-D series);
    preprocess(raw, sizes) -> the tensor its tokenizer takes, for real and synthetic samples alike;
    prompts: caption templates, "{}" standing for the class name;
    tokenizer: a class of tokenizers.py, None for image (CLIP's own frozen path);
    settings(shape, sizes) -> the tokenizer's keyword arguments for inputs of that shape;
    generate(world, sizes, rngs, k) -> (raw signals, raw anchor RGB images or None): the synthetic
        world's generator (world.py), None where the world has none;
    train_share: the synthetic training set's size as a share of --n-train, after real datasets:
        tactile, IMU and EEG sets hold hundreds of samples where video, audio and point sets hold
        thousands (docs/method.md section 5).
    """

    read: Callable
    preprocess: Callable
    prompts: tuple
    tokenizer: Optional[type] = None
    settings: Callable = lambda shape, sizes: {}
    generate: Optional[Callable] = None
    train_share: float = 1.0


SCARCE = 0.15  # the train_share of the modalities whose real datasets are small


def image_like(shape, sizes):
    return dict(image_size=shape[-1])


def normalize_frames(frames, sizes):
    return torch.stack([preprocess.normalize_image(frame, sizes["image_size"]) for frame in frames])


def points_of(arr, sizes):
    if arr.shape[1] < sizes["point_channels"]:
        raise ValueError(f"point cloud has {arr.shape[1]} channels, {sizes['point_channels']} configured")
    return preprocess.normalize_points(arr[:, :sizes["point_channels"]], sizes["points"], sizes["seed"])


MODALITIES = {
    "image": Modality(
        read=lambda path, sizes: readers.read_image(path),
        preprocess=lambda x, sizes: preprocess.normalize_image(x, sizes["image_size"]),
        prompts=("a photo of a {}.", "a picture of a {}.", "an image of a {}."),
        generate=world.gen_image),
    "video": Modality(
        read=lambda path, sizes: readers.read_video_frames(path, sizes["frames"]),
        preprocess=normalize_frames,
        prompts=("a video of a {}.", "a clip of a {}.", "footage of a {}."),
        tokenizer=tokenizers.VideoTokenizer,
        settings=lambda shape, sizes: dict(frames=shape[0], image_size=shape[-1]),
        generate=world.gen_video),
    "audio": Modality(
        read=lambda path, sizes: readers.read_audio(path, sizes["audio_seconds"]),
        preprocess=lambda x, sizes: preprocess.log_mel(x, sizes["audio_seconds"]),
        prompts=("the sound of a {}.", "a recording of a {}.", "audio of a {}."),
        tokenizer=tokenizers.AudioTokenizer,
        settings=lambda shape, sizes: dict(frames=shape[-1]),
        generate=world.gen_audio),
    "point": Modality(
        read=lambda path, sizes: readers.read_point_array(path),
        preprocess=points_of,
        prompts=("a point cloud of a {}.", "a 3D model of a {}.", "a 3D scan of a {}."),
        tokenizer=tokenizers.PointCloudTokenizer,
        settings=lambda shape, sizes: dict(points=shape[0], channels=shape[1], groups=sizes["point_groups"],
                                           neighbours=sizes["point_neighbours"]),
        generate=world.gen_point),
    "depth": Modality(
        read=lambda path, sizes: readers.read_depth_metres(path, sizes.get("depth_format", "mm")),
        preprocess=lambda x, sizes: preprocess.resize_center_crop(preprocess.disparity(x), sizes["image_size"]),
        prompts=("a depth map of a {}.", "a depth image of a {}.", "a depth photo of a {}."),
        tokenizer=tokenizers.DepthTokenizer,
        settings=image_like,
        generate=world.gen_depth),
    "tactile": Modality(
        read=lambda path, sizes: readers.read_image(path),
        preprocess=lambda x, sizes: preprocess.normalize_image(x, sizes["image_size"]),
        prompts=("the touch of a {}.", "a tactile image of a {}.", "the feel of a {}."),
        tokenizer=tokenizers.TactileTokenizer,
        settings=image_like,
        generate=world.gen_tactile,
        train_share=SCARCE),
    "imu": Modality(
        read=lambda path, sizes: readers.read_series(path, 6),
        preprocess=lambda x, sizes: preprocess.normalize_series(x, 6, sizes["imu_length"]),
        prompts=("the motion of a {}.", "inertial readings of a {}.", "movement data of a {}."),
        tokenizer=tokenizers.IMUTokenizer,
        settings=lambda shape, sizes: dict(length=shape[-1], kernel=sizes["series_kernel"]),
        generate=world.gen_imu,
        train_share=SCARCE),
    "eeg": Modality(
        read=lambda path, sizes: readers.read_series(path, sizes["eeg_channels"]),
        preprocess=lambda x, sizes: preprocess.normalize_series(x, sizes["eeg_channels"], sizes["eeg_length"]),
        prompts=("brain activity while seeing a {}.", "an EEG recording of a {}.", "the neural response to a {}."),
        tokenizer=tokenizers.EEGTokenizer,
        settings=lambda shape, sizes: dict(channels=shape[0], length=shape[-1], kernel=sizes["series_kernel"]),
        generate=world.gen_eeg,
        train_share=SCARCE),
}


def register(name, modality):
    """Add a modality (or replace one): from now on it is read, generated, tokenized and evaluated."""
    MODALITIES[name] = modality


def extended():
    """The extended modalities, in registry order: every modality with a tokenizer of its own."""
    return [m for m, spec in MODALITIES.items() if spec.tokenizer is not None]
