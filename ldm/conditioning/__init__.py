from ldm.conditioning.conditioning import Conditioning
from ldm.conditioning.openclip import FrozenOpenCLIPTextEncoder, MissingWeightsError

__all__ = ["Conditioning", "FrozenOpenCLIPTextEncoder", "MissingWeightsError"]
