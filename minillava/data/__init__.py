"""Training data: LLaVA JSON/JSONL, COCO captions and caption JSONL/CSV -> samples -> Encoded tensors.

    file --formats.load_records--> Record(id, images, messages)   (parsed, structure-checked)
         --dataset.SupervisedDataset--> Item(Encoded, image keys)  (tokenised, images decoded in workers)
         --sampler.GroupedBatchSampler--> batches grouped by modality and length
"""

from minillava.data.dataset import SupervisedDataset
from minillava.data.formats import BadSampleError, Record, load_records

__all__ = ["BadSampleError", "Record", "SupervisedDataset", "load_records"]
