"""QFM-IQM: a no-reference image quality model and the pipeline that trains, evaluates, registers and serves it.

Score photos with the pretrained model that ships in the package (qfm/pretrained/, see its MODEL_CARD.md):

    import qfm
    model = qfm.load()              # or qfm.create_metric(); engine="onnxruntime" runs without torch
    model.score("photo.jpg")        # 0-1, higher is better; also PIL images, numpy arrays and lists
    model.mos("photo.jpg")          # on the training set's scale (0-100, higher is better)

`load`, `create_metric` and `QualityModel` come from qfm.api, imported on first use: `import qfm` alone
imports neither torch nor the pipeline.
"""

_API = ("load", "create_metric", "QualityModel")
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        from qfm import api

        return getattr(api, name)
    raise AttributeError(f"module 'qfm' has no attribute '{name}'")
