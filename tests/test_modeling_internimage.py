"""transformers' own common tests for InternImage, written like transformers' test_modeling_convnext.py.

The testers (ModelTesterMixin, BackboneTesterMixin, ConfigTester) are those of the installed transformers version,
fetched from its source distribution by `tests/transformers_common.py`. The explicit skips are exactly ConvNeXt's
(no input embeddings, no feed-forward chunking). One common test is replaced, not skipped:
`test_reverse_loading_mapping` (the checkpoint-conversion mapping registered for OpenGVLab's names is load-only; see
the test). PipelineTesterMixin is not used: it drives pipeline test classes and tiny Hub checkpoints that the sdist
does not ship; tests/test_transformers_integration.py covers
`pipeline("image-classification")` and `pipeline("image-feature-extraction")` from local folders instead.

ConvNeXt's own tester class under the same testers of transformers 5.25.0: 83 passed, 109 skipped (every skip is the
testers' own: no accelerator, no attentions, no embeddings...); InternImage: 83 passed, 103 skipped (the six
conversion-mapping tests ConvNeXt skips run here, since InternImage registers a mapping).
"""

from __future__ import annotations

import tempfile
import unittest

import torch
from transformers.models.auto import modeling_auto
from transformers.testing_utils import torch_device

from internimage_hf import InternImageBackbone, InternImageConfig, InternImageForImageClassification, InternImageModel

from .transformers_common import load

_modeling = load("test_modeling_common")
ModelTesterMixin, floats_tensor, ids_tensor = _modeling.ModelTesterMixin, _modeling.floats_tensor, _modeling.ids_tensor
BackboneTesterMixin = load("test_backbone_common").BackboneTesterMixin
ConfigTester = load("test_configuration_common").ConfigTester


# The testers find a model's task (which labels to build, which classes train) by its class name in transformers'
# own name tables, which list in-library models only; InternImage's names are added there while these tests run.
_TASK_TABLES = {
    "MODEL_MAPPING_NAMES": "InternImageModel",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES": "InternImageForImageClassification",
    "MODEL_FOR_BACKBONE_MAPPING_NAMES": "InternImageBackbone",
}


class _InTaskTables:
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        for table, name in _TASK_TABLES.items():
            getattr(modeling_auto, table)[InternImageConfig.model_type] = name

    @classmethod
    def tearDownClass(cls):
        for table in _TASK_TABLES:
            getattr(modeling_auto, table).pop(InternImageConfig.model_type, None)
        super().tearDownClass()


class InternImageModelTester:
    def __init__(
        self,
        parent,
        batch_size=3,
        image_size=32,
        num_channels=3,
        channels=8,
        depths=(1, 1, 2, 1),
        groups=(1, 2, 2, 4),
        is_training=True,
        use_labels=True,
        num_labels=10,
        initializer_range=0.02,
        out_features=("stage2", "stage3", "stage4"),
        out_indices=(2, 3, 4),
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.num_channels = num_channels
        self.channels = channels
        self.depths = list(depths)
        self.groups = list(groups)
        self.num_stages = len(depths)
        self.hidden_sizes = [channels * 2**i for i in range(self.num_stages)]
        self.is_training = is_training
        self.use_labels = use_labels
        self.num_labels = num_labels
        self.initializer_range = initializer_range
        self.out_features = list(out_features)
        self.out_indices = list(out_indices)

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        labels = ids_tensor([self.batch_size], self.num_labels) if self.use_labels else None
        return self.get_config(), pixel_values, labels

    def get_config(self):
        return InternImageConfig(
            num_channels=self.num_channels,
            channels=self.channels,
            depths=self.depths,
            groups=self.groups,
            initializer_range=self.initializer_range,
            out_features=self.out_features,
            out_indices=self.out_indices,
            num_labels=self.num_labels,
        )

    def create_and_check_model(self, config, pixel_values, labels):
        model = InternImageModel(config=config).to(torch_device).eval()
        result = model(pixel_values)
        # expected last hidden state: B, C, H // 32, W // 32
        self.parent.assertEqual(
            result.last_hidden_state.shape,
            (self.batch_size, self.hidden_sizes[-1], self.image_size // 32, self.image_size // 32),
        )

    def create_and_check_for_image_classification(self, config, pixel_values, labels):
        model = InternImageForImageClassification(config).to(torch_device).eval()
        result = model(pixel_values, labels=labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.num_labels))

    def create_and_check_backbone(self, config, pixel_values, labels):
        model = InternImageBackbone(config=config).to(torch_device).eval()
        result = model(pixel_values)
        self.parent.assertEqual(len(result.feature_maps), len(config.out_features))
        self.parent.assertListEqual(list(result.feature_maps[0].shape), [self.batch_size, self.hidden_sizes[1], 4, 4])
        self.parent.assertEqual(len(model.channels), len(config.out_features))
        self.parent.assertListEqual(model.channels, self.hidden_sizes[1:])

        # out_features=None: the last stage only
        config.out_features = None
        model = InternImageBackbone(config=config).to(torch_device).eval()
        result = model(pixel_values)
        self.parent.assertEqual(len(result.feature_maps), 1)
        self.parent.assertListEqual(list(result.feature_maps[0].shape), [self.batch_size, self.hidden_sizes[-1], 1, 1])
        self.parent.assertListEqual(model.channels, [self.hidden_sizes[-1]])

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


class InternImageModelTest(_InTaskTables, ModelTesterMixin, unittest.TestCase):
    all_model_classes = (InternImageModel, InternImageForImageClassification, InternImageBackbone)

    test_resize_embeddings = False
    has_attentions = False
    test_torch_exportable = True

    def setUp(self):
        self.model_tester = InternImageModelTester(self)
        self.config_tester = ConfigTester(
            self,
            config_class=InternImageConfig,
            has_text_modality=False,
            common_properties=["num_channels", "hidden_sizes"],
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="InternImage does not use inputs_embeds")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="InternImage does not support input and output embeddings")
    def test_model_get_set_embeddings(self):
        pass

    @unittest.skip(reason="InternImage does not use feedforward chunking")
    def test_feed_forward_chunking(self):
        pass

    def test_reverse_loading_mapping(self):
        """Replaces the common test, which expects `save_pretrained` to write the checkpoint's original names: the
        mapping registered for "internimage" (OpenGVLab's remote-code names) acts on loading only, and saving writes
        this package's names. Checked instead: save keeps the model's names, and a state dict under the remote-code
        names loads into every class with the same tensors."""
        from safetensors.torch import load_file, save_file
        from transformers.conversion_mapping import get_model_conversion_mapping

        from .test_conversion_tool import official_state_dict

        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        classifier = InternImageForImageClassification(config)
        for model_class in self.all_model_classes:
            with self.subTest(model_class.__name__):
                model = model_class(config)
                self.assertTrue(get_model_conversion_mapping(model, add_legacy=False))
                with tempfile.TemporaryDirectory() as folder:
                    model.save_pretrained(folder)
                    self.assertEqual(sorted(load_file(f"{folder}/model.safetensors")), sorted(model.state_dict()))
                    save_file(
                        {k: v.contiguous() for k, v in official_state_dict(classifier, remote_code=True).items()},
                        f"{folder}/model.safetensors",
                    )
                    loaded = model_class.from_pretrained(folder)
                expected = classifier.state_dict()
                for key, tensor in loaded.state_dict().items():
                    source = key if key in expected else f"internimage.{key}"
                    self.assertTrue(torch.equal(tensor, expected[source]), key)

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_backbone(self):
        self.model_tester.create_and_check_backbone(*self.model_tester.prepare_config_and_inputs())

    def test_hidden_states_output(self):
        def check_hidden_states_output(inputs_dict, config, model_class):
            model = model_class(config).to(torch_device).eval()
            with torch.no_grad():
                outputs = model(**self._prepare_for_class(inputs_dict, model_class))
            hidden_states = outputs.hidden_states
            self.assertEqual(len(hidden_states), self.model_tester.num_stages + 1)
            # stem output first, NCHW at stride 4
            self.assertListEqual(
                list(hidden_states[0].shape[-3:]),
                [self.model_tester.channels, self.model_tester.image_size // 4, self.model_tester.image_size // 4],
            )

        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            inputs_dict["output_hidden_states"] = True
            check_hidden_states_output(inputs_dict, config, model_class)
            del inputs_dict["output_hidden_states"]
            config.output_hidden_states = True
            check_hidden_states_output(inputs_dict, config, model_class)

    def test_for_image_classification(self):
        self.model_tester.create_and_check_for_image_classification(*self.model_tester.prepare_config_and_inputs())


class InternImageBackboneTest(_InTaskTables, unittest.TestCase, BackboneTesterMixin):
    all_model_classes = (InternImageBackbone,)
    config_class = InternImageConfig
    has_attentions = False

    def setUp(self):
        self.model_tester = InternImageModelTester(self)
