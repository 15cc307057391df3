"""`dynatrain`: train an unmodified timm ViT on the kept patches of a `dynaprep` dataset.

    dynatrain --shards /data/imagenet-dyna --k 70 --out runs/k70          # = dynatrain train ...
    dynatrain --resume runs/k70 --epochs 20                               # continue a run
    torchrun --nproc-per-node 8 -m dynavit.trainer.cli --shards ... --k 70 --out runs/k70
    dynatrain flops --model vit_base_patch16_224 --k 70                   # compute model

Errors in the arguments print one line and exit with code 2 before anything is written.
"""
from __future__ import annotations

import os
import sys

import math

import click
from click.core import ParameterSource

from dynavit.manifests.locations import TRUST_OPTION
from dynavit.pipeline.cli_types import MAX_IMAGE_SIZE, AmpType, DeviceType, FiniteFloat, json_object, out_dir, renamed
from dynavit.trainer.data import DataError
from dynavit.trainer import cli_tools
from dynavit.trainer.analysis.explain import explain_command
from dynavit.trainer.bench import compare as bench_compare, infer as bench_infer, report as bench_report
from dynavit.trainer.bench import step as bench_step, throughput as bench_throughput
from dynavit.trainer.config import SCHEDULES, SELECTS, ConfigError, TrainConfig, resume_config
from dynavit.trainer.selection import METHODS
from dynavit.trainer.augment import ERASE_MODES, parse_jitter
from dynavit.trainer.augment import HELP as AUGMENT_HELP
from dynavit.trainer.epoch import NonFiniteLoss
from dynavit.trainer.train import RunWriteError, train


MAX_LR = 10.0        # AdamW's rate: anything above is a typo, and 1e308 overflows the weights
MAX_EPOCHS = 1_000_000


class DefaultGroup(click.Group):
    """A group that runs `default_command` when the first argument is an option rather than
    a subcommand name, so `dynatrain --shards X` means `dynatrain train --shards X`.
    `dynatrain --help` shows the default command's options followed by the subcommands."""

    def __init__(self, *args, default_command: str = "train", **kwargs):
        super().__init__(*args, **kwargs)
        self.default_command = default_command

    def parse_args(self, ctx, args):
        if args and args[0].startswith("-") and args[0] not in ctx.help_option_names:
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def format_help(self, ctx, formatter):
        command = self.commands[self.default_command]
        sub_ctx = command.make_context(ctx.info_name, [], resilient_parsing=True)
        command.format_help(sub_ctx, formatter)
        self.format_commands(ctx, formatter)


def _jitter(ctx, param, value):
    """--color-jitter parsed and range-checked while parsing (one line, exit 2)."""
    try:
        parts = parse_jitter(value)
    except ValueError:
        parts = []
    ok = value is None or (parts is not None and len(parts) in (3, 4) and all(math.isfinite(v) and v >= 0 for v in parts)
                           and (len(parts) < 4 or parts[3] <= 0.5))
    if not ok:
        raise click.BadParameter(f"{value!r}: give B, B,C,S or B,C,S,H (numbers >= 0, hue <= 0.5)")
    return parts


def recipe_options(f):
    """Recipe options (trainer/recipe.py, trainer/augment.py), timm's train.py names."""
    for option in reversed([
        click.option("--hflip", type=FiniteFloat(0, 1), default=0.5, show_default=True, help="Probability of a horizontal flip per training sample; 0 turns flips off (digits, text, charts, scans with a fixed orientation). The kept-patch indices are mirrored with the pixels."),
        click.option("--vflip", type=FiniteFloat(0, 1), default=0.0, show_default=True, help="Probability of a vertical flip per training sample (indices mapped alike)."),
        click.option("--trivial-color/--no-trivial-color", default=False, show_default=True, help="TrivialAugment (wide) with its colour-only ops: per sample one of identity, autocontrast, equalize, posterize, solarize, color, contrast, brightness at a random magnitude. Its shear, translate, rotate and sharpness ops are left out: they move or blend pixels across patches."),
        click.option("--color-jitter", callback=_jitter, metavar="B[,C,S[,H]]", help="Colour jitter: brightness, contrast, saturation factors in [1-v, 1+v] (one value for all three) and a hue shift in [-h, h]. " + AUGMENT_HELP + " [default: off]"),
        click.option("--reprob", type=FiniteFloat(0, 1), default=0.0, show_default=True, help="Random erasing probability (timm's box draw); only pixels inside kept patches are erased."),
        click.option("--remode", type=click.Choice(ERASE_MODES), default="pixel", show_default=True, help="Random erasing fill: pixel (normal noise per pixel) or const (the dataset mean)."),
        click.option("--model-ema-decay", type=FiniteFloat(0, 1, min_open=True, max_open=True), help="Keep an EMA of the weights (e.g. 0.9998), updated every optimizer step, evaluated every epoch (ema_acc1 in metrics.jsonl) and saved in last.pt/best.pt as model_ema. [default: off]"),
        click.option("--layer-decay", type=FiniteFloat(0, 1, min_open=True), help="Layer-wise LR decay for fine-tuning (timm's param_groups_layer_decay): block i of D trains at lr x decay^(D-i), embeddings at decay^(D+1), head at lr. [default: off; cropr fine-tuning (--checkpoint/--pretrained): 0.75, its authors' recipe, which also warms up over 10 %% of the epochs under --sched cosine when --warmup-epochs is 0]"),
        click.option("--accum-steps", type=click.IntRange(1), default=1, show_default=True, help="Loader batches per optimizer step (gradient accumulation): equal to --batch-size x this in one step; a tail of fewer batches per epoch is not read."),
        click.option("--mixup", type=FiniteFloat(0), default=0.0, show_default=True, help="Mixup alpha (timm's, batch mode); the kept set is the top-K of the two images' scores blended with the pixels' weight. 0 = off."),
        click.option("--cutmix", type=FiniteFloat(0), default=0.0, show_default=True, help="CutMix alpha: a patch-aligned box of the partner image; the kept set is re-selected to exactly K from both images' stored scores, and the label weight is each image's share of the kept tokens. 0 = off."),
        click.option("--mixup-prob", type=FiniteFloat(0, 1), default=1.0, show_default=True, help="Probability of mixing a batch (with --mixup or --cutmix)."),
        click.option("--mixup-switch-prob", type=FiniteFloat(0, 1), default=0.5, show_default=True, help="Probability of CutMix rather than Mixup when both are on."),
        click.option("--drop-path", type=FiniteFloat(0, 1, max_open=True), help="Stochastic depth rate (timm's drop_path_rate; a shortcut for --model-kwargs). [default: the model's]"),
    ]):
        f = option(f)
    return f


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """dynatrain: train timm ViTs on saliency-pruned token sequences."""


@cli.command("train", short_help="Train a ViT on the kept patches (the default).", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@renamed("--input-size", "--image-size", "input_size", type=click.IntRange(1, MAX_IMAGE_SIZE))
@click.option("--shards", type=click.Path(file_okay=False), help="Dataset directory written by `dynaprep index` (holds dataset.json).")
@click.option("--out", type=click.Path(file_okay=False), callback=out_dir, help="Run directory: config.json, metrics.jsonl, last.pt, best.pt, summary.json. Must be empty or new unless --overwrite.")
@click.option("--k", "k", type=click.IntRange(1, 100), help="Percent of patches kept in training: one of the dataset's ks, or 100 for the dense model (any 1..100 with --select random/center or a cropping --input-size).")
@click.option("--k-rule", "k_rule", default=None, metavar="mass:TAU|budget:K[,floor=F,ceil=C]",
              help="Adaptive K per image from the stored scores instead of --k: mass:TAU keeps the fewest patches "
                   "holding TAU of the image's score mass; budget:K calibrates TAU so the mean kept count is K's; "
                   "floor/ceil in percent. Samples run packed (docs/ADAPTIVE_K.md).")
@click.option("--eval-k", type=click.IntRange(1, 100), help="Percent of patches kept in evaluation (one of the dataset's ks, or 100 = dense; any 1..100 with --select random/center or a cropping --input-size). [default: --k]")
@click.option("--scorer", default=None, help="Saliency scorer whose index shards pick the patches (l2, sobel, entropy, contrast, distinct; must be in the dataset; definitions in docs/FORMAT.md). [default: the dataset's first scorer]")
@click.option("--select", type=click.Choice(SELECTS), default="saliency", show_default=True,
              help="Which patches to keep: top-K by saliency, a seeded random K, the K nearest the center, or all (dense).")
@click.option("--method", type=click.Choice(METHODS), default="dynavit", show_default=True,
              help="Token reduction: dynavit (the K % most salient patches, before the encoder), or inside the encoder "
                   "from every patch: tome (ToMe merging), evit (EViT top-attention tokens at blocks 4/7/10), and the "
                   "learned dynamicvit, tnt, cropr, svit (their heads trained with the model; svit keeps the "
                   "tokens it skips and its rate is dynamic per image). Their parameter (r, keep "
                   "rate, rho, ...; svit: its expected MACs) is chosen so that their exact MACs match Dyna-ViT's at --k. Each runs as its authors' "
                   "code does and, when fine-tuning (--checkpoint/--pretrained), with their recipe: dynamicvit "
                   "backbone lr x0.01 held in warm-up + distillation from the start weights, tnt frozen backbone, "
                   "evit/tome/cropr/dynavit the whole model (evit from scratch: its keep-rate warm-up). Sources and "
                   "details: docs/BASELINES.md.")
@click.option("--model", default="vit_base_patch16_224", show_default=True, help="timm model name (a VisionTransformer), optionally with a pretrained tag.")
@click.option("--model-kwargs", callback=json_object, metavar="JSON", help="Extra timm.create_model kwargs as a JSON object, e.g. '{\"drop_path_rate\": 0.1}'.")
@click.option("--pretrained/--no-pretrained", default=False, show_default=True, help="Start from timm's pretrained weights (downloaded by timm); the classifier is re-initialised for this dataset's classes.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Start from local weights: a timm/torch state_dict or a dynatrain last.pt/best.pt. A classifier of another shape is dropped.")
@click.option("--image-size", "input_size", type=click.IntRange(1, MAX_IMAGE_SIZE), help="Model input size in pixels (a patch-aligned crop of larger stored images). [default: the stored size]")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Images per step per process.")
@click.option("--workers", type=click.IntRange(0), default=min(4, os.cpu_count() or 1), show_default=True, help="Data loading worker processes per process (the batches do not depend on it).")
@click.option("--epochs", type=click.IntRange(1, MAX_EPOCHS), default=10, show_default=True, help="Total epochs (with --resume: train until this many are done).")
@click.option("--lr", type=FiniteFloat(0, MAX_LR, min_open=True), default=1e-4, show_default=True, help="AdamW peak learning rate.")
@click.option("--weight-decay", type=FiniteFloat(0), default=0.05, show_default=True, help="AdamW weight decay (not applied to biases, norms, pos_embed, cls/reg tokens).")
@click.option("--sched", type=click.Choice(SCHEDULES), default="step", show_default=True, help="LR schedule, advanced every step: step (×--gamma every --step-epochs, as in the paper) or cosine (to 0).")
@click.option("--step-epochs", type=click.IntRange(1), default=3, show_default=True, help="--sched step: epochs between LR decays.")
@click.option("--gamma", type=FiniteFloat(0, min_open=True), default=0.1, show_default=True, help="--sched step: LR multiplier at each decay.")
@click.option("--warmup-epochs", type=FiniteFloat(0, MAX_EPOCHS), default=0.0, show_default=True, help="Linear LR warmup, in (fractional) epochs, before either schedule.")
@click.option("--amp", type=AmpType(), default="auto", show_default=True, help="Mixed precision: bf16, fp16 (CUDA only, with loss scaling), off; auto = bf16 on CUDA GPUs that support it, off on CPU.")
@click.option("--clip-grad", type=FiniteFloat(0, min_open=True), help="Clip the global gradient norm to this value. [default: no clipping]")
@click.option("--label-smoothing", type=FiniteFloat(0, 1, max_open=True), default=0.0, show_default=True, help="Label smoothing of the training loss (evaluation loss is plain cross-entropy).")
@click.option("--ratio-weight", type=FiniteFloat(0), default=2.0, show_default=True, help="--method dynamicvit: weight of its keep-ratio loss (its authors' --ratio_weight: 2 for DeiT-S, 5 for DeiT-B).")
@click.option("--teacher", default="auto", show_default=True, metavar="auto|none|RUN|CKPT", help="Distil from a dense teacher: a weights file or a run directory (its best.pt), same model, same classes. DynamicViT then adds its KL + token distillation (weights 0.5, 0.5), any other method 0.5 x KL of the logits. auto: the method's recipe (DynamicViT distils from its own start weights when fine-tuning and the classifier was loaded; the others none). See docs/BASELINES.md.")
@click.option("--backbone-lr-scale", type=FiniteFloat(0), help="The timm backbone's learning rate is --lr x this (0 = frozen); the method's own modules and a fresh classifier train at --lr. [default: the method's recipe when fine-tuning (--checkpoint/--pretrained): dynamicvit 0.01 and fixed during --warmup-epochs, tnt 0, others 1; 1 from scratch]")
@click.option("--task", type=click.Choice(["classify", "segment"]), default="classify", show_default=True,
              help="segment: semantic segmentation on a `--data voc-seg` dataset: the method's dense patch features "
                   "(trainer/methods/dense.py) + a 1x1-conv head, per-pixel CE ignoring 255, mIoU per class in "
                   "summary.json (docs/SEGMENTATION.md). One process, constant --lr, no flips/crops/resume.")
@click.option("--preserve/--no-preserve", default=True, show_default=True,
              help="--task segment with dynavit: pruned patches keep their embedding in the feature map (SViT's "
                   "preserved tokens); --no-preserve: they are 0.")
@click.option("--seed", type=int, default=42, show_default=True, help="Seeds Python, NumPy, torch and the data order (reseeded per epoch from seed and epoch).")
@click.option("--compile/--no-compile", default=False, show_default=True, help="torch.compile the training forward.")
@click.option("--device", type=DeviceType(resolve=False, index=False), default="auto", show_default=True, help="auto = CUDA if available, else CPU. Under torchrun each rank uses cuda:LOCAL_RANK.")
@click.option("--skip-bad-samples/--fail-on-bad-samples", default=False, show_default=True, help="Skip samples that fail to decode (counted as `skipped` in metrics.jsonl) instead of stopping.")
@click.option("--val-split", help="Split evaluated after every epoch. [default: val, else test]")
@click.option("--images-root", metavar="DIR|URL", help="A dataset indexed in place (dynaprep --data wds): where the user's tars are now, if they moved since indexing. Remote tars (http(s)://, s3://, pipe:) are copied once into $DYNAVIT_CACHE (default ~/.cache/dynavit) and checked against their indexed sha256, or streamed with --stream. With --stream it also names where a dynaprep dataset's own image tars are (train/images-*.tar under it: the folder synced to a bucket), the rest of the folder staying local. [default: dataset.json's images_root]")
@click.option("--stream", is_flag=True, help="Read the image tars front to back, once per epoch, without a local copy (http(s)://, s3://, gs://, local files, a pipe: --images-root), on the webdataset library: per-epoch seeded shard shuffle, shards split by rank then by worker, a --stream-buffer sample shuffle buffer, and the same steps per epoch on every rank (whole shards per rank: a short share is read again, a long one cut). Not automatic for URLs: without it a remote tar is copied into the cache and read by offset (a global permutation, every sample once per epoch, independent of --workers). Epochs are exact to resume; the order depends on --workers. README 'Scaling out'.")
@click.option("--stream-buffer", type=click.IntRange(1), default=1000, show_default=True, help="--stream: samples held in each worker's shuffle buffer (filled before the first batch).")
@click.option(TRUST_OPTION, "trust_dataset_urls", is_flag=True, help="Let dataset.json / shards.parquet name remote URLs and pipe: commands for the image tars. Without it a dataset folder may only name local paths under itself or its images root (a downloaded folder could otherwise run commands); --images-root may always be a URL.")
@click.option("--resume", is_flag=False, flag_value="", default=None, type=click.Path(file_okay=False), metavar="[RUN]", help="Continue the run in --out (or in RUN) from its last.pt with its saved options; options given again override them (e.g. --epochs).")
@click.option("--overwrite", is_flag=True, help="Allow a non-empty --out: its run files are replaced (other files are left alone).")
@recipe_options
@click.pass_context
def train_command(ctx, **options):
    """Train a timm ViT on the top-K saliency patches of a dynaprep dataset.

    Epochs are exact: each visits every training sample once across all ranks and workers,
    in a fresh seeded permutation (samples are read from the shards by byte offset, so any
    shard layout mixes, class-sorted ones too), minus a tail smaller than world size × batch
    size; the order does not depend on --workers. --stream reads the tars front to back
    instead (shard shuffle + sample buffer; see --stream).

    Each epoch trains on the `train` split and evaluates top-1 / top-5 on the validation
    split; metrics.jsonl gets one line per epoch (epoch, train_loss, val_loss, acc1, acc5 in
    percent, epoch_seconds, images_per_s, seq_len S = prefix tokens + kept patches, k, eval_k,
    lr, skipped; ema_acc1 with --model-ema-decay). Under `torchrun --nproc-per-node N` it trains
    with DistributedDataParallel. Recipe options (flips, colour ops, mixing, EMA, layer decay,
    accumulation) keep the kept-patch indices exact: docs/RECIPES.md.
    """
    if options["resume"] == "":  # a bare --resume: the run in --out
        if not options["out"]:
            raise click.BadParameter("a bare --resume continues the run in --out: give --out RUN (or --resume RUN)",
                                     param_hint="'--resume'")
        options["resume"] = options["out"]
    try:
        if options["resume"]:
            given = {name: value for name, value in options.items()
                     if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
                     and name != "resume"}
            cfg, changed = resume_config(options["resume"], given)
            if changed:
                click.echo(f"note: --resume with changed {', '.join(changed)}: the result will differ "
                           f"from an uninterrupted run", err=True)
        else:
            cfg = TrainConfig(**options)
        if cfg.task == "segment":
            from dynavit.trainer.segment.run import train_segment
            return train_segment(cfg)
        return train(cfg)
    except ConfigError as e:
        raise click.BadParameter(str(e), param_hint=f"'{e.param}'" if e.param else None) from None
    except (DataError, NonFiniteLoss, RunWriteError) as e:  # a bad shard mid-run, a diverged run, disk full: exit 1
        raise click.ClickException(str(e)) from None


# The tools' commands (cli_tools.py) and the benchmarks' (each in its bench/ module),
# registered after the group exists.
for _command in (cli_tools.flops_command, cli_tools.report_command, cli_tools.predict_command,
                 cli_tools.evaluate_command, cli_tools.compare_command,
                 bench_throughput.bench_command, bench_step.bench_step_command,
                 bench_report.bench_report_command, bench_infer.bench_infer_command,
                 bench_compare.bench_compare_command, explain_command):
    cli.add_command(_command)


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


def main(args=None) -> None:
    """Console entry point. Argument errors print one line (no usage block) and exit 2."""
    try:
        rv = cli.main(args=args, prog_name="dynatrain", standalone_mode=False)
    except _NO_ARGS_IS_HELP as e:  # bare `dynatrain`: the help, as click shows it
        e.show()
        sys.exit(e.exit_code)
    except click.ClickException as e:
        rank, world = os.environ.get("RANK", "0"), int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            click.echo(f"Error: {e.format_message()}", err=True)
        elif e.exit_code != 2 or rank == "0":
            # A bad argument fails every rank alike: rank 0 says it. A data error is met by
            # one rank; the others then only see their collective break, so every rank
            # that fails says why, with its rank.
            click.echo(f"Error (rank {rank}/{world}): {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
