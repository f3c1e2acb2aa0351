"""The training engine: one run of `python -m training.run`, in phases around a `Run` (state.py).

    setup.py       accelerator, output folder, data, base model (+ tiny teacher), adapters, optimizer, resume
    batches.py     the global micro-batch: latents, noise, the uniforms table, text conditioning
    loop.py        stage switching and the optimizer step
    finish.py      exports (stage LoRAs, the unified LoRA, the 1-step UNet), samples.png, metrics.json
    checkpoint.py  atomic accelerate checkpoints + the stages' own state as safetensors
    progress.py    progress bar, log.jsonl, TensorBoard
    samples.py     the sample grid (TCD through schedulers/)
"""


def train(cfg, args):
    """`python -m training.run`: run every stage of `cfg` and write the outputs; returns the output folder."""
    return run_training(cfg, resume=args.resume, overwrite=args.overwrite, show_bar=not args.quiet).out_dir


def run_training(cfg, resume=None, overwrite=False, show_bar=True, base=None, dataset=None, summary=True):
    """The same run as a library call; returns the finished `Run` (its UNet keeps every adapter).

    base: a models.base.Base to train instead of loading cfg.model.base (e.g. a pixel-space model with an
    identity VAE and its own `Base.text_fn`); dataset: samples {"pixel_values", "caption"} instead of
    building cfg.data (it needs `bucket_ids`, see data.ImageCaptionDataset)."""
    from training.engine import finish, loop, setup

    run = setup.start_run(cfg, resume, overwrite, base=base, dataset=dataset)
    run.summary = summary
    setup.attach_trainables(run)
    setup.resume(run, resume)
    setup.attach_data(run)
    loop.train_stages(run, show_bar=show_bar)
    finish.finish_run(run)
    return run
