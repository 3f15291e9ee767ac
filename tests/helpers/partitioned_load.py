"""Load a checkpoint under ZeRO-3 the way the trainer does and record, per rank, what each rank holds.

    deepspeed --num_gpus 2 tests/helpers/partitioned_load.py MODEL_DIR MM_PROJECTOR.bin OUT_DIR

Each rank writes OUT_DIR/rank<R>.json: whether every parameter was partitioned at load (local shape [0], a ZeRO
partition only), the rank's partition size against the model's size, and whether the gathered weights equal a
plain load's, with the imported projector in place.
"""
import json
import os
import sys

import torch
from transformers import AutoConfig

from lvlm_region.train import engine
from lvlm_region.model.families import find_parts
from lvlm_region.model.load import load_model, skeleton
from lvlm_region.model.projector import import_projector, read_mm_projector
from lvlm_region.model.trainable import projector_parameters


def main() -> None:
    model_dir, projector_file, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    engine.init_distributed()
    # As the trainer: the file is read and checked (against a meta skeleton) before ZeRO-3 loading starts.
    tensors = read_mm_projector(projector_file, find_parts(skeleton(AutoConfig.from_pretrained(model_dir))).projector)
    reference = load_model(model_dir, torch.float32).state_dict()  # a plain load, for comparison
    loading = engine.PartitionedLoading(engine.build_ds_config(3, None, 1, 1, 1.0, "fp32"))
    model = load_model(model_dir, torch.float32)
    params = dict(model.named_parameters())
    report = {"partitioned": all(hasattr(p, "ds_id") and p.numel() == 0 for p in params.values()),
              "local": sum(p.ds_tensor.numel() for p in params.values()),
              "total": sum(p.ds_numel for p in params.values())}
    with loading.writable(projector_parameters(model)):
        import_projector(model, tensors)
    loading.close()
    with engine.gathered(params.values(), True):
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    prefix = next(n for n, m in model.named_modules() if m is find_parts(model).projector) + "."
    report["checkpoint_equal"] = state.keys() == reference.keys() and all(
        torch.equal(state[k], reference[k]) for k in reference if not k.startswith(prefix))
    report["projector_imported"] = all(torch.equal(state[prefix + k], t.float()) for k, t in tensors.items())
    with open(os.path.join(out, f"rank{engine.rank()}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
    engine.exit_process(0)
