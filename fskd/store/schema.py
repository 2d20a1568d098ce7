"""The one definition of the Zarr feature-store layout (schema version 3).

```
<store>.zarr/                 attrs: see ROOT_ATTRS
  <split>/                    one group per sample split: train, val, test
    features    (sample, dim)  float16 (or float32) on disk, chunked by rows
    labels      (sample,)      int32, index into text/classnames; -1 = skipped unreadable file
    sample_ids  (sample,)      str, the sample's ref relative to the dataset root
    checksums   (chunk,)       uint32, CRC-32 of each row chunk as stored (features bytes in
                               the on-disk dtype, then labels as int32), set with the flag
    written     (chunk,)       bool, one flag per row chunk, set only after the chunk is stored
  text/
    classnames        (class,)       str, names used in prompts
    classkeys         (class,)       str, stable class identifiers (folder names, wnids)
    prompts           (template,)    str, the templates used
    class_embeddings  (class, dim_t) float32, L2-normalised prompt-ensemble means (if the
                                     encoder has a text tower)
  views/                      optional (``fskd extract --augment-views V``): augmented views of
                              train rows; attrs: VIEWS_ATTRS
    rows        (row,)            int64, the train-split row each view row belongs to (ascending)
    labels      (row,)            int32, its label; -1 = the image could not be read again
    features    (row, view, dim)  like train/features, V random-resized-crop + flip views per row,
                                  chunked by rows (chunk_rows rows x V views)
    checksums   (chunk,)          uint32, CRC-32 of each row chunk (features, then labels)
    written     (chunk,)          bool, one flag per row chunk, set last
```

The views group is built under a temporary name inside the store and renamed into place, so it
either exists whole (arrays and attributes) or not at all; its chunks then follow the same commit
rule as the splits'. A store without it is complete; adding views never changes the split arrays
or the store's fingerprint.

Readers check ``format`` and ``schema_version`` and the presence, shape and dtype of every
array; a mismatch raises StoreError naming the path and the array.

Commit rule (what makes a chunk trustworthy): a row chunk is written in this order, each step a
whole-object write (zarr writes a chunk file to a temporary name and renames it):
  1. the features chunk and the labels chunk,
  2. its checksum,
  3. its ``written`` flag, last.
A kill before step 3 leaves the flag False and the chunk is encoded again on resume; so a flag
is True only for a chunk whose data and checksum are complete. Every array is created with
``write_empty_chunks`` on, so each chunk a writer stored exists as an object: a chunk marked
written whose object is missing (deleted, lost in a copy) is an error naming the array and chunk,
never rows of fill values. ``fskd info --check`` re-computes every checksum; ``fskd extract`` on
an existing store does the same and re-encodes the chunks that fail (a repair).

Reads verify too: every array's codec chain ends with zarr's ``crc32c`` codec, so a chunk whose
stored bytes changed (a flipped bit that still decodes) fails inside zarr's own read, and every
features block read is refused if it holds NaN or inf; both are errors naming the array and
chunk. What the read-time CRC cannot see is a whole valid chunk object put at another chunk's key
(a bad copy): the per-chunk ``checksums`` (CRC-32 of the decoded rows and labels) catch that in
``fskd info --check`` and ``fskd extract``. Features are refused at write time when non-finite.

On object storage (``--store s3://...``, see ``location.py``) there is no rename, but every PUT of
one object is atomic (a reader sees the old object or the whole new one) and read-after-write
consistent (S3 since 2020, GCS, Azure). The rules become:
  - Creating a store: the root ``zarr.json`` is written first with ``format`` =
    ``CREATING_FORMAT`` and its ``creator`` (host, pid, process start time, a random token), by a
    conditional PUT: ``If-None-Match: *`` where no root exists, ``If-Match`` the ETag read where
    it takes over an interrupted creation; of processes racing for it, one holds the claim. The
    claimant removes every other object under the prefix (what an interrupted creation left:
    groups, arrays, a half-written text group; only fskd writes that marker, so nothing it did
    not write is removed), writes every group and array (ids, labels, text), then the root
    attributes again, whole (``format`` = ``FORMAT``), with ``If-Match`` its own claim: that last
    PUT is the completion marker, and it fails for a creator whose claim was taken over. Only
    the root is ever written first, and it is never deleted, so no state lacks it.
    A reader refuses a root still marked as being created. ``fskd extract`` refuses it while its
    creator runs on this machine (same host, live pid, same start time: "another fskd extract is
    creating ...; rerun when it finishes"), and otherwise (the creator is gone, or on another
    machine, where fskd cannot tell) takes the creation over and makes the store again; a
    creator taken over while still running stops at its commit with a StoreError. An ``fskd
    extract`` that finds the store completed meanwhile resumes into it. A prefix that holds
    other objects and no root is refused. Elsewhere than S3 the ``If-Match`` takeover and commit
    are unconditional (gcsfs and memory have the ``If-None-Match`` create).
  - A chunk: the same three steps as above, each one object (``checksums`` and ``written`` have
    one object per row chunk, so nodes writing disjoint chunks never rewrite each other's).
  - The views group: its ``zarr.json`` is written first with ``format`` = ``VIEWS_CREATING``, then
    its arrays, then its attributes whole (``format`` = ``VIEWS_FORMAT``); an unfinished one is
    treated as absent and made again.
  - Finishing: a store is complete when every ``written`` flag is set (no separate marker to
    lose).
Two independent ``fskd extract`` processes (not one torchrun job) writing one remote store at
once: the creation is claimed as above (one creates, the other refuses or, once the store is
complete, resumes into it); filling it is not locked (object stores have no flock), and two
fillers write identical bytes for identical inputs, but run one job per store.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FORMAT = "fskd-feature-store"
#: the root's format while a store is being created on object storage (the completion marker replaces it)
CREATING_FORMAT = "fskd-feature-store (being created)"
#: 3: every array carries zarr's CRC-32C codec, checked on every read (2: per-chunk checksums)
SCHEMA_VERSION = 3

SPLITS = ("train", "val", "test")
TEXT_GROUP = "text"
FEATURES, LABELS, SAMPLE_IDS, WRITTEN, CHECKSUMS = "features", "labels", "sample_ids", "written", "checksums"
CLASSNAMES, CLASSKEYS, PROMPTS, CLASS_EMBEDDINGS = "classnames", "classkeys", "prompts", "class_embeddings"

#: attributes every store carries at its root
ROOT_ATTRS = (
    "format",  # FORMAT
    "schema_version",  # SCHEMA_VERSION
    "fskd_version",
    "fingerprint",  # hash of every input below: same inputs -> same store
    "created",  # ISO time
    "encoder",  # Encoder.describe(): spec, dims, joint, web_scale, preprocess
    "dataset",  # name, root, listing fingerprint
    "class_split",  # {"base": [...], "val": [...], "novel": [...]} class indices, + "source"
    "sample_split",  # {"rule": str, "sizes": {split: n}}
    "splits",  # the split groups present
    "dim",  # image feature dimension
    "dtype",  # on-disk dtype of features
    "chunk_rows",
    "text",  # {"available": bool, "dim": int|None, "source": "templates"|"descriptions", ...}
    "config",  # the ExtractConfig that created it
)

#: the optional group of augmented train views, and its arrays (FEATURES, LABELS, CHECKSUMS, WRITTEN too)
VIEWS_GROUP, VIEW_ROWS = "views", "rows"
#: attributes of the views group
VIEWS_ATTRS = (
    "format",  # VIEWS_FORMAT
    "split",  # the sample split the rows index: "train"
    "views",  # V, views per row
    "rows",  # {"rule": "all"} (every readable train row) or {"rule": "shots", "shots": K, "seeds": [...]}
    "transform",  # {"name", "scale", "ratio", "flip", "size", "interpolation", "seed"}
)
VIEWS_FORMAT = "fskd-train-views"
VIEWS_CREATING = "fskd-train-views (being created)"

FEATURE_DTYPES = {"float16": np.float16, "float32": np.float32}


def n_chunks(n_rows: int, chunk_rows: int) -> int:
    return -(-n_rows // chunk_rows)


def chunk_checksum(features: npt.ArrayLike, labels: npt.ArrayLike) -> int:
    """CRC-32 of one row chunk: its features in the on-disk dtype, then its labels as int32."""
    import zlib

    crc = zlib.crc32(np.ascontiguousarray(features).tobytes())
    return zlib.crc32(np.ascontiguousarray(labels, dtype=np.int32).tobytes(), crc)
