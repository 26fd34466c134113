"""Models: any timm backbone as a token encoder, the attention-panel decoder, the model factory (``create_model``), weight loading.

    from qfm.models import create_model
    model = create_model("qfm_mobilenetv2")          # ImageNet weights from the installed package
    scores = model(images)                           # (B,); uint8 images are normalised by the model,
                                                     # float ones must be normalised with model.mean / std
"""

from qfm.models.backbone import Backbone
from qfm.models.decoder import AttentionPanelDecoder
from qfm.models.factory import (
    QfmIqm,
    Tokens,
    create_model,
    list_models,
    normalise_uint8,
    pixel_affine,
    register_model,
)
from qfm.models.weights import fetch_to_local, load_weights, map_by_order, packaged_weights

__all__ = [
    "AttentionPanelDecoder", "Backbone", "QfmIqm", "Tokens", "create_model", "fetch_to_local", "list_models",
    "load_weights", "map_by_order", "normalise_uint8", "packaged_weights", "pixel_affine", "register_model",
]
