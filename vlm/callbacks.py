"""Lightning callbacks of a training run."""

from __future__ import annotations

import json

import lightning as L


class SampleLog(L.Callback):
    """Appends what each training step consumed (batch number, sample keys, stream indices, a mixture's source names)
    to a JSON-lines file: which data a step saw, and the check that a resumed run neither skips nor repeats a sample."""

    def __init__(self, path):
        self.path = path

    def on_train_batch_end(self, trainer, module, outputs, batch: dict, batch_idx: int) -> None:
        line = {"rank": trainer.global_rank, "batch": module.stream_position.batches - 1, "step": trainer.global_step,
                "keys": batch["keys"], "stream_index": batch["stream_index"].tolist()}
        if "sources" in batch:  # a mixture: each sample's source
            line["sources"] = batch["sources"]
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
