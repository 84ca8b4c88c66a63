"""GLM-Image helpers: per-image VQ prior tokens, and working image-to-image sampling.

Why this exists (diffusers 0.42.1 + transformers 5.23): `GlmImageForConditionalGeneration.
get_image_features(...).pooler_output` is a *list* with one `(C, h, w)` feature map per image, and
`get_image_tokens` expects that list. `GlmImagePipeline.generate_prior_tokens` instead concatenates
the list (`torch.cat(..., dim=0)` -> `(N*C, h, w)`, or an error when sizes differ) and passes the
tensor, so `get_image_tokens` iterates over channels and the VQ conv fails with
`RuntimeError: ... expected input[1, 1, h, w] to have C channels`. Image-to-image sampling with the
stock pipeline therefore always fails. (Text-to-image is unaffected: there the model tokenizes no
source image, and inside `generate()` the model itself passes the list correctly.)

- `image_tokens_per_image` obtains the VQ tokens of each image correctly; training uses it for the
  target image's prior tokens (DiT conditioning, AR targets) and for condition images.
- `FixedGlmImagePipeline` is `GlmImagePipeline` with `generate_prior_tokens` corrected for
  condition images; everything else is inherited. Load it directly
  (`FixedGlmImagePipeline.from_pretrained(path)`) or convert a loaded pipeline with
  `fix_glm_image_pipeline(pipe)`. Nothing is patched globally.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import GlmImagePipeline


@torch.no_grad()
def image_tokens_per_image(ar_model, processor_or_pixel_values: Any, images: Any) -> list[torch.LongTensor]:
    """VQ image tokens of each image, as the GLM-Image AR model reads them.

    Args:
        ar_model: a `GlmImageForConditionalGeneration` (or its inner `GlmImageModel`).
        processor_or_pixel_values: either a `GlmImageProcessor` / `GlmImageImageProcessor`, in which
            case `images` are the images (PIL images, arrays or tensors; one or a list), or the packed
            `pixel_values` the image processor produced, in which case `images` is their
            `image_grid_thw` (`(num_images, 3)`).

    Returns:
        One 1-D LongTensor per image with `grid_h * grid_w` codebook indices in row-major order:
        exactly the ids the model substitutes for that image's `<|image|>` placeholders. With the
        GLM-Image processor that is (H/32) * (W/32) tokens for an H x W image (the DiT side uses
        them upsampled 2x, see `upsample_image_tokens`).
    """
    if isinstance(processor_or_pixel_values, torch.Tensor):
        pixel_values = processor_or_pixel_values
        grids = torch.as_tensor(images, dtype=torch.long)
    else:
        image_processor = getattr(processor_or_pixel_values, "image_processor", processor_or_pixel_values)
        image_list = list(images) if isinstance(images, (list, tuple)) else [images]
        features = image_processor(images=image_list, return_tensors="pt")
        pixel_values, grids = features["pixel_values"], features["image_grid_thw"]
    if grids.ndim != 2 or grids.shape[1] != 3:
        raise ValueError(f"image_grid_thw must have shape (num_images, 3), got {tuple(grids.shape)}")
    if bool((grids[:, 0] != 1).any()):
        raise ValueError(f"GLM-Image tokenizes still images only (grid t == 1), got grids {grids.tolist()}")
    parameter = next(ar_model.parameters())
    feature_maps = ar_model.get_image_features(
        pixel_values.to(parameter.device), grids.to(parameter.device)).pooler_output
    # `get_image_tokens` takes the list of per-image (C, h, w) maps; call it per image so each
    # image's tokens stay separate (and sizes may differ).
    tokens = [ar_model.get_image_tokens([feature_map]).view(-1).long() for feature_map in feature_maps]
    expected = (grids[:, 1] * grids[:, 2]).tolist()
    for index, (image_tokens, count) in enumerate(zip(tokens, expected)):
        if image_tokens.numel() != count:
            raise RuntimeError(f"image {index}: got {image_tokens.numel()} VQ tokens, grid {grids[index].tolist()} "
                               f"expects {count}")
    return tokens


def upsample_image_tokens(tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.LongTensor:
    """Nearest 2x upsampling of one image's (grid_h * grid_w) tokens to the DiT's (2h * 2w) grid,
    as `GlmImagePipeline` does for prior tokens."""
    grid = tokens.reshape(1, 1, grid_h, grid_w).float()
    return torch.nn.functional.interpolate(grid, scale_factor=2, mode="nearest").long().view(-1)


class FixedGlmImagePipeline(GlmImagePipeline):
    """`GlmImagePipeline` whose image-to-image prior-token step tokenizes each condition image
    with `image_tokens_per_image` instead of concatenating feature maps across images.

    Text-to-image goes through the parent unchanged. The image-to-image branch follows the
    parent step by step (same chat messages, processor call, generation parameters, seeding,
    AR sampling and 2x upsampling), so outputs match what the upstream code intends.
    """

    def generate_prior_tokens(
        self,
        prompt: str | list[str],
        height: int,
        width: int,
        image: list[list[Any]] | None = None,
        device: torch.device | None = None,
        generator: torch.Generator | None = None,
    ):
        if image is None:
            return super().generate_prior_tokens(
                prompt=prompt, height=height, width=width, image=None, device=device, generator=generator)

        device = device or self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch_size = len(prompts)
        num_condition_images = len(image[0])
        messages = [
            [{"role": "user", "content": [{"type": "image", "image": img} for img in image[index]]
              + [{"type": "text", "text": text}]}]
            for index, text in enumerate(prompts)
        ]
        inputs = self.processor.apply_chat_template(
            messages, tokenize=True, padding=batch_size > 1, target_h=height, target_w=width,
            return_dict=True, return_tensors="pt").to(device)

        grids = inputs["image_grid_thw"]
        images_per_sample = inputs.get("images_per_sample")
        grids_per_sample = int(images_per_sample[0]) if images_per_sample is not None else grids.shape[0]
        max_new_tokens, large_image_offset, token_h, token_w = self._compute_generation_params(
            image_grid_thw=grids[:grids_per_sample], is_text_to_image=False)

        # Source (condition) image tokens: grid order is [s0 sources..., s0 target, s1 sources..., ...].
        source_index = [sample * grids_per_sample + i for sample in range(batch_size)
                        for i in range(num_condition_images)]
        source_grids = grids[source_index]
        source_tokens = image_tokens_per_image(self.vision_language_encoder, inputs["pixel_values"], source_grids)
        upsampled = [upsample_image_tokens(tokens, int(grid[1]), int(grid[2]))
                     for tokens, grid in zip(source_tokens, source_grids)]
        upsampled_grids = source_grids.clone()
        upsampled_grids[:, 1:] *= 2
        prior_token_image_ids_per_sample = [
            torch.cat(upsampled[sample * num_condition_images:(sample + 1) * num_condition_images])
            for sample in range(batch_size)
        ]
        source_image_grid_thw_per_sample = list(torch.split(upsampled_grids, num_condition_images))

        # AR sampling of the target tokens, seeded like the parent (generate() takes no generator).
        if generator is not None:
            seed = generator.initial_seed()
            torch.manual_seed(seed)
            if device is not None and torch.device(device).type == "cuda":
                torch.cuda.manual_seed(seed)
        outputs = self.vision_language_encoder.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True)
        input_length = inputs["input_ids"].shape[-1]
        prior_token_ids = torch.cat([
            self._upsample_token_ids(
                self._extract_large_image_tokens(outputs[index:index + 1], input_length, large_image_offset,
                                                 token_h * token_w),
                token_h, token_w)
            for index in range(batch_size)
        ], dim=0)
        return prior_token_ids, prior_token_image_ids_per_sample, source_image_grid_thw_per_sample

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save in the upstream layout: `model_index.json` names `GlmImagePipeline`, so the folder
        loads with `DiffusionPipeline.from_pretrained` (and with this class, explicitly)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        index_path = Path(save_directory) / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = GlmImagePipeline.__name__
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def fix_glm_image_pipeline(pipeline: GlmImagePipeline) -> FixedGlmImagePipeline:
    """The same components as `pipeline` (no copies), wrapped in `FixedGlmImagePipeline`."""
    if isinstance(pipeline, FixedGlmImagePipeline):
        return pipeline
    fixed = FixedGlmImagePipeline(**pipeline.components)
    fixed.set_progress_bar_config(**getattr(pipeline, "_progress_bar_config", {}))
    return fixed
