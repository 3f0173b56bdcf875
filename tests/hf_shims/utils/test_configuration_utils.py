"""Stand-in for transformers' tests/utils/test_configuration_utils.py (not in its sdist).

`config_common_kwargs`: each attribute every transformers v5 config has, with a value other than its default, so
that `ConfigTester.check_config_arguments_init` can see each one reach the config.
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["InternImageForImageClassification"],
    "id2label": {0: "label"},
    "label2id": {"label": 0},
    "problem_type": "regression",
}
