"""The training engine: one run of `python -m training.run`, in phases around a `Run` (state.py).

    setup.py       accelerator, output folder, data, base model (+ tiny teacher), adapters, optimizer, resume
    batches.py     the global micro-batch: latents, noise, the uniforms table, text conditioning
    loop.py        stage switching and the optimizer step
    finish.py      exports (stage LoRAs, the unified LoRA, the 1-step UNet), samples.png, metrics.json
    checkpoint.py  the trainer's own checkpoints (safetensors + JSON; nothing is unpickled on resume)
    output.py      the output folder: checks, marker, temp leftovers, cleanup after a failed fresh run
    progress.py    progress bar, log.jsonl, TensorBoard
    samples.py     the sample grid (TCD through schedulers/)
"""


def train(cfg, args):
    """`python -m training.run`: run every stage of `cfg` and write the outputs; returns the output folder."""
    run_training(cfg, resume=args.resume, overwrite=args.overwrite, show_bar=not args.quiet)
    return cfg.output.dir


def run_training(cfg, resume=None, overwrite=False, show_bar=True, base=None, dataset=None, summary=True):
    """The same run as a library call; returns the finished `Run` (its UNet keeps every adapter).

    base: a models.base.Base to train instead of loading cfg.model.base (e.g. a pixel-space model with an
    identity VAE and its own `Base.text_fn`); dataset: samples {"pixel_values", "caption"} instead of
    building cfg.data (it needs `bucket_ids`, see data.ImageCaptionDataset). Resuming a run whose outputs
    were already written from its last checkpoint does nothing and returns None."""
    import os

    from training.engine import finish, loop, output, setup

    done = resume and output.finished_message(cfg, resume)
    if done:
        if os.environ.get("RANK", "0") == "0":
            print(done, flush=True)
        return None
    run = setup.start_run(cfg, resume, overwrite, base=base, dataset=dataset)
    run.summary = summary
    with output.removed_on_user_error(run):
        setup.write_run_files(run, copy_teacher=base is None and cfg.model.base == "tiny")
        setup.attach_trainables(run)
        setup.resume(run, resume)
        setup.attach_data(run)
        loop.train_stages(run, show_bar=show_bar)
        finish.finish_run(run)
    return run
