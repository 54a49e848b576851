"""One process of a multi-process SFT run under DeepSpeed (launched by torchrun from the tests).

    torchrun --standalone --nproc_per_node 2 zero_worker.py OUT_DIR DEEPSPEED_JSON GAS RESUME_FROM|none NEFTUNE_ALPHA

Writes OUT_DIR/rank{R}.json with the parameters this process holds, and the run's metrics.jsonl.
"""

import json
import os
import sys

import torch

torch.set_num_threads(1)

from fastalign.algorithms import SFTConfig, SFTTrainer  # noqa: E402
from fastalign.engine.distributed import wrap_for_inference  # noqa: E402
from fastalign.models.tiny import char_tokenizer, tiny_model  # noqa: E402

ROWS = [{"prompt": f"{a} {b}=", "completion": str(a * b)} for a in range(9) for b in range(7)]


def main(out, deepspeed, gas, resume, neftune):
    args = SFTConfig(output_dir=out, learning_rate=1e-2, max_steps=5, max_tokens_per_batch=96, weight_decay=0.01,
                     gradient_accumulation_steps=gas, disable_tqdm=True, seed=0, deepspeed=deepspeed or None,
                     save_steps=2, save_total_limit=None, neftune_noise_alpha=neftune or None,
                     resume_from_checkpoint=resume)
    trainer = SFTTrainer(tiny_model("llama", hidden_size=32, layers=2, heads=2, seed=1), args=args,
                         train_dataset=ROWS, tokenizer=char_tokenizer())
    result = trainer.train()
    params = list(trainer.model.parameters())
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    stage = trainer.engine.zero_stage
    # A frozen model beside the trained one (a reference): sharded under ZeRO-3, else a replica.
    ids = torch.tensor([[5, 17, 30, 4, 9]])
    plain = tiny_model("llama", hidden_size=32, layers=2, heads=2, seed=7)
    with torch.no_grad():
        want = plain(ids).logits
        frozen = wrap_for_inference(tiny_model("llama", hidden_size=32, layers=2, heads=2, seed=7), trainer.engine)
        frozen_diff = float((frozen(ids).logits - want).abs().max())
    frozen_held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in frozen.parameters())
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"steps_run": result["steps"], "held": held, "total": total, "stage": stage, "world": trainer.world_size,
                   "frozen_diff": frozen_diff, "frozen_held": frozen_held, "frozen_grad": any(p.requires_grad for p in frozen.parameters())}, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no destroy_process_group: gloo teardown can abort at exit


if __name__ == "__main__":
    out, config, gas = sys.argv[1], sys.argv[2], int(sys.argv[3])
    resume, neftune = sys.argv[4], float(sys.argv[5])
    main(out, json.loads(config) if config != "none" else None, gas, None if resume == "none" else resume, neftune)
