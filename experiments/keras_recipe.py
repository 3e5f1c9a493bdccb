"""The classic Keras transfer-learning recipe on an image folder, among the strategy grid.

The recipe (the Keras guide and Chollet's 2016 "very little data" post):
`VGG16(weights='imagenet', include_top=False)` at 150x150, every base layer frozen, a new top
`Flatten -> Dense(256, relu) -> Dropout(0.5) -> Dense(classes, softmax)`, `Adam(1e-4)`,
categorical cross-entropy, batch 32, `ImageDataGenerator(rotation_range=40,
width_shift_range=0.2, height_shift_range=0.2, shear_range=0.2, zoom_range=0.2,
horizontal_flip=True, fill_mode='nearest')`, then the guide's second stage: the top
convolutional block (`block5`) unfrozen and trained with the head at a 10x smaller learning
rate. That is the row `head_then_top:k=1,lr_scale=0.1,head=0.5` (half the epoch budget for
each stage). Around it, under the same head, augmentation, optimizer and budget: the frozen
base alone (`linear_probe`: the recipe's first stage, trained, not solved, since the head
is an MLP), the top block (`partial:k=1`), everything (`full`) and LP-FT. The learning rate
of every row, the recipe's included, is chosen on validation from {3e-5, 1e-4, 3e-4}
(1e-4, the guide's, is the middle; every candidate's score is in selection.csv).

Where this differs from the guide, and why:
- `rescale=1/255` is replaced by VGG16's own preprocessing (`caffe`: BGR, ImageNet mean
  subtracted), the input the ImageNet weights were trained on; rescaled inputs would reach
  the network 255x smaller than anything it has seen.
- The loss is cross-entropy on logits (the softmax is applied in the loss and at
  prediction): the same function, computed stably.
- No early stopping (the guide trains its epochs), as `train.early_stopping.enabled=False`.
Each cell's per-class report (scikit-learn's `classification_report`) is printed as it
finishes and written to classification_reports.md; the best model per target is kept
(`save_model="best"`) for `tlresearch.deploy.export` and `tlresearch.deploy.predict`.

Needs a folder (`train/<class>/*.jpg`, optional `validation/`, `test/`; Keras's
`cats_and_dogs_filtered` has this layout) and the ImageNet weights once (README, "ImageNet
backbones and real data"):
  --config.targets="['folder:/path/to/cats_and_dogs_filtered']"

CPU smoke run (docs/deploy.md), on a folder generated from the digits dataset and the
project's offline ResNet-8 (pretrained on the glyph source task) at 32 px in place of VGG16:
  python -m tlresearch.tools.to_folder --dataset=digits --out=/tmp/digits_folder --per_class=20
  python -m tlresearch.run --experiment=keras_recipe \
    --config.targets="['folder:/tmp/digits_folder']" --config.model.family=resnet \
    --config.model.pretrained= --config.model.width=16 --config.model.input_size=32 \
    --config.seeds=[0] --config.train.epochs=6 --config.selection.enabled=False
"""
import ml_collections

from tlresearch.core import schema

RECIPE = "head_then_top:k=1,lr_scale=0.1,head=0.5"
STRATEGIES = (RECIPE, "linear_probe", "partial:k=1", "full", "lp_ft:probe=0.5")


def get_config() -> ml_collections.ConfigDict:
  c = schema.sweep(targets=["folder:cats_and_dogs_filtered"], seeds=[0, 1, 2], k_shot=0,
                    target="folder:cats_and_dogs_filtered", save_model="best")
  c.model = schema.keras_model(family="vgg16", input_size=150, dropout_rate=0.5)
  c.model.head = schema.head(pooling="flatten", hidden=[256], activation="relu")
  c.train = schema.train(epochs=30, batch_size=32, optimizer="adam", lr=1e-4, weight_decay=0.0,
                          warmup_epochs=0.0, schedule="constant")
  a = c.train.augment
  a.enabled, a.rotation, a.width_shift, a.height_shift = True, 40.0, 0.2, 0.2
  a.shear, a.zoom, a.horizontal_flip, a.fill_mode = 0.2, 0.2, True, "nearest"  # shear: degrees
  c.train.early_stopping.enabled = False
  c.selection.lr = [3e-5, 1e-4, 3e-4]
  c.selection.weight_decay = [0.0]
  c.grid = [{"strategy": list(STRATEGIES)}]
  c.report.reference = RECIPE
  c.report.axis_labels = []
  c.report.classification_reports = True
  return c
