"""After TRL 0.7.10's docs/source/ddpo_trainer.mdx (the image hook, and "Using the finetuned
model"), imports ported to fastalign.trl: a DDPOTrainer on DefaultDDPOStableDiffusionPipeline with
the docs' image_outputs_hook, step() after train(), then the pipeline called on prompts.
Replaced: the Hub pipeline -> "fastalign/tiny-sd" (built in); the aesthetic reward -> mean
brightness; float32 on a CPU (the docs cast to float16 on a GPU); tiny sampling settings.
Usage: ddpo_docs.py OUTPUT_DIR."""

import itertools
import sys

import numpy as np
import torch
from PIL import Image

from fastalign.trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

OUT = sys.argv[1]


def image_outputs_hook(image_data, global_step, accelerate_logger):
    # For the sake of this example, we only care about the last batch
    # hence we extract the last element of the list
    result = {}
    images, prompts, _, rewards, _ = image_data[-1]
    for i, image in enumerate(images):
        pil = Image.fromarray(
            (image.cpu().numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
        )
        pil = pil.resize((256, 256))
        result[f"{prompts[i]:.25} | {rewards[i]:.2f}"] = [pil]
    accelerate_logger.log_images(
        result,
        step=global_step,
    )


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), {}


config = DDPOConfig(num_epochs=1, sample_num_steps=2, sample_batch_size=2, train_batch_size=1,
                    sample_num_batches_per_epoch=1, mixed_precision="no", output_dir=OUT)
pipeline = DefaultDDPOStableDiffusionPipeline("fastalign/tiny-sd", use_lora=True)
animals = itertools.cycle(["cat", "dog"])
trainer = DDPOTrainer(config, brightness, lambda: (next(animals), {}), pipeline, image_samples_hook=image_outputs_hook)
trainer.train()
global_step = trainer.step(1, trainer.global_step)  # another epoch by hand, after train()
trainer.save_pretrained(f"{OUT}/saved")

pipeline = DefaultDDPOStableDiffusionPipeline("fastalign/tiny-sd")
device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
dtype = torch.float16 if device.type == "cuda" else torch.float32
pipeline.vae.to(device, dtype)
pipeline.text_encoder.to(device, dtype)
pipeline.unet.to(device, dtype)
prompts = ["squirrel", "crab"]
results = pipeline(prompts, num_inference_steps=2, height=64, width=64)
for prompt, image in zip(prompts, results.images):
    image.save(f"{OUT}/{prompt}.png")
