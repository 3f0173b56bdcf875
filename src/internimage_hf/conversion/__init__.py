"""Official InternImage checkpoints -> this package's models: the whole conversion and publishing tool.

It depends on the model (configuration, modeling, labels, processing) and nothing in the model depends on it:

- `errors`: `ConversionError`, the one error type (and `PickleRefused`).
- `keys`: the one key mapping (`KEY_RULES`), for `.pth` files and, registered with transformers by
  `internimage_hf._register`, for `from_pretrained` on OpenGVLab remote-code repos.
- `source`: reading `.pth` files and repo folders safely, their configs, tensor checks.
- `detect`: which variant a state dict is; `releases`: the official releases and the manifest.
- `pipeline`: read, detect, build, verify, card, save (`convert_checkpoint`, `convert`, `model_from_official`).
- `output`: atomic output folders; `card`: model cards; `hub`: Hub download and upload; `batch`: `convert-all`.

Nothing is imported here, so `internimage_hf.conversion.errors` or `.keys` stay light.
"""
