"""The strategy grid on an ImageNet-pretrained Keras backbone (VGG16) and a real dataset.

The same question as `finetune_sweep` (which transfer strategy wins, by how much), asked the
classic way: Keras's `VGG16(weights='imagenet', include_top=False)` with a new head, on
Oxford Flowers-102 (102 classes, 1,020 train / 1,020 validation / 6,149 test images, from
TFDS). The defaults are a GPU run: 224 px inputs, every training image, 3 paired seeds.

Needs the weights and the data once (see README, "ImageNet backbones and real data"):
  ~/.keras/models/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5  (Keras fetches it)
  tfds build oxford_flowers102 --data_dir=$TLRESEARCH_DATA_DIR

Other backbones and data by config only: --config.model.family=resnet50,
--config.model.family=mobilenet_v2, --config.targets="['tfds:cifar10']" or
"['folder:/path/to/images']" (train/<class>/*.jpg).

CPU smoke run (32 px, 1 example per class, 1 epoch, 2 strategies, 1 seed, evaluation on
fixed subsets of 100 validation and 200 test images):
  --config.model.input_size=32 --config.k_shot=1 --config.train.epochs=1 --config.seeds=[0]
  --config.data.val_examples=100 --config.data.test_examples=200
  --config.grid="[{'strategy': ['linear_probe', 'full']}]"
"""
import ml_collections

from tlresearch.core import schema
from experiments.finetune_sweep import STRATEGIES


def get_config() -> ml_collections.ConfigDict:
  c = schema.sweep(targets=["tfds:oxford_flowers102"], seeds=[0, 1, 2], k_shot=0,
                    target="tfds:oxford_flowers102")
  c.model = schema.keras_model()  # VGG16 with Keras's ImageNet weights
  # VGG16 has no BatchNorm: a smaller rate than the small ResNet's, 32 images a step.
  c.train = schema.train(epochs=20, batch_size=32, lr=0.01)
  c.train.augment.horizontal_flip = True  # flowers (unlike glyphs) are mirror-symmetric
  c.selection.enabled = False  # one shared lr (each cell is costly at 224 px)
  # The base probe is solved to convergence (tlresearch.methods.probe); with dropout or augmentation
  # its objective is stochastic, so those two probe rows train by SGD at the shared lr.
  c.grid = [                   # blocks of axes, each crossed with targets x seeds
      {"strategy": STRATEGIES + ["scratch"]},
      {"strategy": ["linear_probe", "full"], "model.dropout_rate": [0.5]},
      {"strategy": ["linear_probe", "full"], "train.augment.enabled": [True]},
  ]
  return c
