"""Image-text data: WebDataset shards in img2dataset layout, decoding and transforms, synthetic shapes.

`ImageTextDataModule` lives in `ldm.data.datamodule` (the one module that imports Lightning), the synthetic
shapes (writer, CLI, judge) in `ldm.data.synthetic`.
"""

from ldm.data.transforms import ImageTransform, SampleError, decode_caption, decode_image, to_rgb
from ldm.data.webdataset import SkipCounter, expand_urls, image_text_pipeline

__all__ = [
    "ImageTransform",
    "SampleError",
    "SkipCounter",
    "decode_caption",
    "decode_image",
    "expand_urls",
    "image_text_pipeline",
    "to_rgb",
]
