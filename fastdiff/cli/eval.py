"""`fastdiff eval bpd` and `fastdiff eval fid`.

    fastdiff eval bpd runs/shapes --data shapes --n 256 --steps 100
    fastdiff eval fid runs/shapes --data shapes --n 2000 --steps 50
    fastdiff eval fid samples.npz --data shapes --features inception \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth
    fastdiff eval fid runs/cifar --protocol cifar10-50k --data cifar-10-batches-bin \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth
    torchrun --nproc-per-node 8 -m fastdiff eval fid runs/cifar --protocol cifar10-50k ...

A run folder is sampled exactly as `fastdiff sample` samples it (same labels, guidance,
seed and noise contract), so `eval fid` measures the images users get. Under torchrun each
rank draws and featurises its block of whole batches, the features are gathered once, and
rank 0 reports the numbers one process would (cmd_eval_fid).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fastdiff.cli.sample import add_sampler_options, class_labels, guidance_scale_of, image_shape, load_for_sampling
from fastdiff.cli.train import DEFAULT_FEATURE_STEPS
from fastdiff.errors import UserError
from fastdiff.options import positive_int


# --------------------------------------------------------------------------- eval fid
#: What `eval fid` does when neither an option nor --protocol says otherwise.
FID_DEFAULTS = dict(features="shapes", n=2000, n_reference=None, split="train", quantize="round",
                    reference_resize="direct")


def _count_or_all(text: str):
    if text == "all":
        return "all"
    return positive_int(text)


def _add_fid_parser(eval_subparsers) -> None:
    from fastdiff.metrics.pipeline import PROTOCOLS, QUANTIZE_MODES, RESIZE_MODES

    e = eval_subparsers.add_parser(
        "fid", help="FID and KID (optionally precision/recall) of samples against a dataset",
        description="Fréchet distance between feature statistics of generated samples and of a reference "
        "dataset, with KID beside it. SOURCE is a run folder (samples are drawn as `fastdiff sample` draws "
        "them) or an .npz of samples (uint8 NHWC 'images', as `fastdiff sample` writes). Reference images "
        "are all of the set or a seeded random subset (never the first n in file order). FID is biased "
        "upwards at small n: compare numbers only at equal n, with the same features and options; "
        "--protocol cifar10-50k is the setting of published CIFAR-10 FIDs.")
    e.add_argument("source", help="run folder (holding checkpoint.json) or `fastdiff export` .safetensors file "
                   "(samples drawn as `fastdiff sample` draws them), .npz of samples, or shard folder of "
                   "`fastdiff sample --out DIR/`")
    e.add_argument("--data", required=True, help="reference dataset, as for train")
    e.add_argument("--protocol", choices=sorted(PROTOCOLS), default=None,
                   help="a published evaluation setting; cifar10-50k: " + PROTOCOLS["cifar10-50k"].description +
                   ". It sets --features, --n, --n-reference, --split, --quantize and --reference-resize "
                   "(giving another value for one of them is an error) and needs --inception-weights")
    e.add_argument("--split", choices=("train", "test"), default=None,
                   help="reference split where the dataset has one (default: train)")
    e.add_argument("--features", choices=("shapes", "inception"), default=None,
                   help="feature network: the project's shapes CNN (default) or the FID Inception-v3")
    e.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="state dict of the FID Inception-v3 (pt_inception-2015-12-05-6726825d.pth); "
                   "required with --features inception, never downloaded")
    e.add_argument("--shapes-features", default=None, metavar="PATH",
                   help="trained shapes feature network (folder from `fastdiff train-features`); default: "
                   "train one into a cache folder next to SOURCE if none is there yet")
    e.add_argument("--features-steps", type=positive_int, default=DEFAULT_FEATURE_STEPS,
                   help=f"training steps for that on-the-fly network (default: {DEFAULT_FEATURE_STEPS})")
    e.add_argument("--features-dataset-size", type=positive_int, default=4000,
                   help="generated shapes to train that network on (default: 4000)")
    e.add_argument("--n", type=positive_int, default=None,
                   help="generated images (default: 2000; from an .npz with more: a seeded random subset, "
                   "with fewer: all it has)")
    e.add_argument("--n-reference", type=_count_or_all, default=None, metavar="N|all",
                   help="reference images (default: --n): a seeded random subset of the set, or all of it")
    e.add_argument("--subset-seed", type=int, default=0,
                   help="seed of the random subsets (reference, .npz samples, KID); default 0")
    e.add_argument("--quantize", choices=QUANTIZE_MODES, default=None,
                   help="how drawn (or float) samples become 8-bit images: round (default; what `fastdiff "
                   "sample` writes) or floor (truncate, as the DDPM and guided-diffusion samplers save them)")
    e.add_argument("--reference-resize", choices=RESIZE_MODES, default=None,
                   help="direct (default): reference images go to the feature network at their stored size "
                   "and it resizes them (pytorch-fid's pipeline); to-samples: resized to the samples' size "
                   "first (what eval fid did before --reference-resize existed)")
    e.add_argument("--device", default="cpu",
                   help="where samples are drawn and features computed: cpu (default; `fastdiff sample` draws "
                   "on the CPU too, so the images are the same), cuda, cuda:i or auto (faster; drawn images "
                   "then differ from the CPU's by float rounding)")
    add_sampler_options(e)
    e.add_argument("--kid", action=argparse.BooleanOptionalAction, default=True,
                   help="report KID (mean ± std over subsets; unbiased at any n) beside FID (default: on)")
    e.add_argument("--kid-subsets", type=positive_int, default=100)
    e.add_argument("--kid-subset-size", type=positive_int, default=1000)
    e.add_argument("--precision-recall", action="store_true",
                   help="also report improved precision/recall (k=3 nearest neighbours)")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    e.set_defaults(func=cmd_eval_fid)


def _fid_settings(args) -> dict:
    """FID_DEFAULTS, overridden by --protocol, overridden by explicit options (an explicit option
    that contradicts the protocol is an error: its numbers would not be the protocol's)."""
    from fastdiff.metrics.pipeline import PROTOCOLS

    settings = dict(FID_DEFAULTS)
    protocol = PROTOCOLS.get(args.protocol)
    for key in settings:
        given = getattr(args, key)
        if protocol is not None and key in protocol.settings:
            fixed = protocol.settings[key]
            if given is not None and given != fixed:
                raise UserError(f"--protocol {protocol.name} sets --{key.replace('_', '-')} {fixed}; got "
                                f"--{key.replace('_', '-')} {given}")
            settings[key] = fixed
        elif given is not None:
            settings[key] = given
    if settings["n_reference"] is None:
        settings["n_reference"] = settings["n"]
    return settings


def sample_shard(model, labels, args, guidance_scale: float, start: int, stop: int, quantize_mode: str):
    """Samples [start, stop) of those `fastdiff sample` draws with these options, as uint8 batches.

    By the noise contract (sample i's noise depends on (seed, i) only; `sample_offset`), a shard
    holds the same images whichever process draws it; with `start` a multiple of the batch size
    (`batch_aligned_share`) every forward batch is one a single process runs too."""
    from fastdiff.metrics.pipeline import quantize
    from fastdiff.sampling import sample_in_batches

    y = None if labels is None else labels[start:stop]
    for x in sample_in_batches(model, stop - start, args.batch_size, y=y, steps=args.steps, eta=args.eta,
                               seed=args.seed, sample_offset=start, sampler=args.sampler,
                               progress=not args.no_progress, guidance_scale=guidance_scale):
        yield quantize(x.cpu(), quantize_mode)


def _generated(args, settings, source: Path, device, rank: int = 0, world: int = 1, log=print):
    """-> (uint8 batches of this rank's share of the samples, n (all ranks), image size,
    description, cache folder, subset record). Rank r of W takes the block of whole batches
    `batch_aligned_share` gives it (all of them on one process)."""
    import torch

    from fastdiff.data import load_npz
    from fastdiff.metrics.pipeline import choose_subset, image_batches, quantize
    from fastdiff.sampling.shards import is_shard_folder, load_shard_folder
    from fastdiff.train.distributed import batch_aligned_share

    n = settings["n"]
    shards = source.is_dir() and is_shard_folder(source)  # `fastdiff sample --out DIR/` (torchrun)
    model_file = source.is_file() and source.suffix in (".safetensors", ".pt2")  # `fastdiff export [--compiled]`
    if (source.is_file() and not model_file) or shards:
        if not shards and source.suffix != ".npz":
            raise UserError(f"{source}: expected a run folder, an exported model (.safetensors, .pt2), an .npz of "
                            "samples or a shard folder")
        # uint8 as `fastdiff sample` writes; floats in [0,1]/[-1,1] also work
        ds = load_shard_folder(source) if shards else load_npz(source, size=None)
        if args.protocol and len(ds) < n:
            raise UserError(f"--protocol {args.protocol} needs {n} samples; {source} has {len(ds)}")
        idx, record = choose_subset(len(ds), n, args.subset_seed)
        record.update(_stored_quantisation(args, source, stored_uint8=ds.images.dtype == torch.uint8,
                                           mode=settings["quantize"]))
        start, stop = batch_aligned_share(len(idx), args.batch_size, rank, world)
        batches = (x if x.dtype == torch.uint8 else quantize(x, settings["quantize"])
                   for x in image_batches(ds, idx[start:stop], args.batch_size))
        return batches, len(idx), ds.shape[-1], f"{source} ({len(ds)} images)", source.parent, record
    if not (source.is_dir() or model_file):
        raise FileNotFoundError(f"{source}: no such run folder, exported model or .npz file")
    model, origin = load_for_sampling(str(source), args.no_ema)
    model.to(device)
    labels, n, _ = class_labels(model, n)
    if args.steps > model.diffusion.T:
        raise UserError(f"--steps {args.steps} exceeds the model's T={model.diffusion.T}")
    w = guidance_scale_of(model, args.guidance_scale)
    on = f" on {world} ranks" if world > 1 else ""
    log(f"sampling {n} images from {source} ({origin}, {args.sampler}, {args.steps} steps, eta={args.eta}){on}")
    start, stop = batch_aligned_share(n, args.batch_size, rank, world)
    batches = sample_shard(model, labels, args, w, start, stop, settings["quantize"])
    record = {"kind": "drawn", "n": n, "quantized": settings["quantize"]}
    return batches, n, image_shape(model)[-1], f"run {source}", source.parent if model_file else source, record


def _stored_quantisation(args, source: Path, stored_uint8: bool, mode: str) -> dict:
    """8-bit samples were quantised when they were written (`fastdiff sample` rounds): an
    explicit --quantize cannot apply to them (an error, not a silent no-op), and a protocol that
    truncates gets a warning in the output."""
    if not stored_uint8:
        return {"quantized": mode}
    if args.quantize is not None:
        raise UserError(f"--quantize {args.quantize}: {source} holds 8-bit images, quantised when they were "
                        "written; --quantize applies to samples drawn from a run folder or stored as floats")
    record = {"quantized": "stored"}
    if args.protocol and mode != "round":
        record["warning"] = (f"{source} holds 8-bit images quantised when written (`fastdiff sample` rounds); "
                             f"--protocol {args.protocol} truncates ({mode}) the samples it draws from a run "
                             "folder or reads as floats, so this FID can differ slightly from the protocol's")
    return record


def _extractor(args, settings, base: Path, image_size: int, log=print):
    from fastdiff.metrics.features import SHAPES_RECORD, InceptionV3Features, load_shapes_features
    from fastdiff.train.features import train_shapes_features

    if settings["features"] == "inception":
        if not args.inception_weights:
            raise UserError("--features inception needs --inception-weights PATH (the FID Inception-v3 state "
                            "dict, pt_inception-2015-12-05-6726825d.pth); nothing is downloaded")
        return InceptionV3Features(args.inception_weights)
    if args.inception_weights:
        raise UserError("--inception-weights is given but --features is 'shapes'; add --features inception")
    if args.shapes_features:
        return load_shapes_features(args.shapes_features)
    # trained at the samples' size (at least 12, the generator's smallest); others are resized to it
    size = max(12, image_size)
    cache = base / "fid-cache" / f"shapes-features-{size}px-steps{args.features_steps}-seed{args.seed}"
    if (cache / SHAPES_RECORD).is_file():
        log(f"using the cached shapes feature network in {cache}")
    else:
        log(f"no --shapes-features given: training the shapes feature network ({args.features_steps} steps, "
            f"seed {args.seed}, {size}x{size} images) into {cache}")
        t0 = time.time()
        train_shapes_features(cache, steps=args.features_steps, seed=args.seed, image_size=size,
                              dataset_size=args.features_dataset_size, progress=not args.no_progress)
        log(f"trained in {time.time() - t0:.1f}s")
    return load_shapes_features(cache)


def _rank0_first(make, rank: int, world: int, device):
    """make() on rank 0, then on the other ranks: a feature network trained into the cache
    folder on the fly is trained once, by rank 0, and read from the cache by the others. When
    rank 0 fails every rank stops (none is left waiting at a collective)."""
    from fastdiff.train import distributed

    result, error = None, None
    if rank == 0:
        try:
            result = make()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others learn of it
            error = e
    failed = distributed.from_rank0(error is not None, world, device)
    if error is not None:
        raise error
    if failed:
        raise UserError("rank 0 could not prepare the feature network (see its error)")
    return result if rank == 0 else make()


def _float32_features(extractor, batches):
    """(N, F) features of image batches (uint8, or floats in [-1, 1]), as the extractor gives
    them (float32, FeatureExtractor's contract); N may be 0."""
    import torch

    from fastdiff.data import to_model_range

    parts = [extractor(x if x.is_floating_point() else to_model_range(x)).float().cpu() for x in batches]
    return torch.cat(parts) if parts else torch.empty(0, extractor.dim)


def _features_of(extractor, batches):
    """(N, F) float64 features of image batches (uint8, or floats in [-1, 1])."""
    features = _float32_features(extractor, batches)
    if features.shape[0] == 0:
        raise UserError("no images to compute features of")
    return features.double().numpy()


def _all_features(extractor, batches, world: int, device):
    """`_features_of` of every rank's batches, gathered in rank order (`gather_rows`): the rows
    one process computes, in its order.

    The features themselves are gathered, not mergeable sums (`FeatureStats`): KID draws random
    subsets of them and precision/recall takes nearest neighbours among them, and the FID of
    the gathered rows is the one-process computation on the same numbers (bitwise, where each
    batch's features are: the same batches at the same thread count), while merged sums would
    differ by rounding. The cost is N x F float32 once (50,000 x 2048: 0.4 GB), small next to
    drawing the samples; float32 is what extractors return, so sending it loses nothing."""
    if world == 1:
        return _features_of(extractor, batches)
    from fastdiff.train.distributed import gather_rows

    rows = gather_rows(_float32_features(extractor, batches), world, device)
    if rows.shape[0] == 0:
        raise UserError("no images to compute features of")
    return rows.double().numpy()


def _reference(args, settings, size: int):
    """-> (reference set, chosen indices, subset record)."""
    from fastdiff.metrics.pipeline import PROTOCOLS, choose_subset, load_reference

    n_ref = None if settings["n_reference"] == "all" else settings["n_reference"]
    reference = load_reference(args.data, settings["split"], settings["reference_resize"], size,
                               n_builtin=n_ref or 10000)
    protocol = PROTOCOLS.get(args.protocol)
    if protocol is not None:
        shape = getattr(reference, "shape", None)
        if len(reference) != protocol.reference_count or shape is None or shape[-2:] != (protocol.image_size,) * 2:
            raise UserError(f"--protocol {protocol.name} compares against the {protocol.reference_count} "
                            f"{protocol.image_size}x{protocol.image_size} CIFAR-10 {settings['split']} images; "
                            f"--data {args.data} has {len(reference)} images of shape {shape}")
        if size != protocol.image_size:
            raise UserError(f"--protocol {protocol.name} needs {protocol.image_size}x{protocol.image_size} "
                            f"samples; these are {size}x{size}")
    idx, record = choose_subset(len(reference), n_ref, args.subset_seed)
    return reference, idx, record


def _small_n_warning(n_gen: int, n_ref: int, dim: int):
    if min(n_gen, n_ref) >= dim:
        return None
    return (f"n = {min(n_gen, n_ref)} is below the feature dimension {dim}: the covariances are singular and "
            "FID is biased upwards (compare FIDs only at equal n; KID is unbiased at any n; published "
            "CIFAR-10 FIDs use 50,000 samples: --protocol cifar10-50k)")


def check_json_output(path) -> None:
    """--json is checked before the evaluation, not after it."""
    if path is not None:
        from fastdiff.io import check_output_file
        from fastdiff.train.checkpoint import refuse_run_file
        refuse_run_file(path, "--json")
        check_output_file(path, "--json")


def cmd_eval_fid(args: argparse.Namespace) -> int:
    """Under torchrun (env:// contract: WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
    every rank draws (or reads) its block of whole batches of the samples and of the reference
    images and computes their features; the features are gathered once and rank 0 computes and
    writes the result, the numbers of one process (`_all_features` says why)."""
    from fastdiff.train import distributed

    check_json_output(args.json)
    rank, world, device = distributed.setup(args.device)
    try:
        if rank != 0:
            args.no_progress = True
        features = _fid_features(args, rank, world, device)
        if rank == 0:
            _report_fid(args, features, world)
    finally:
        distributed.teardown(world)
    return 0


def _fid_features(args, rank: int, world: int, device):
    """Every rank's part of the work; returns (on every rank) the gathered features and what
    the report says about them."""
    from fastdiff.metrics.pipeline import image_batches
    from fastdiff.train.distributed import batch_aligned_share

    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    t0 = time.time()
    settings = _fid_settings(args)
    source = Path(args.source).expanduser()
    batches, n_gen, size, what, base, gen_record = _generated(args, settings, source, device, rank, world, log)
    if n_gen < 2:
        raise UserError(f"{source}: FID needs at least 2 generated images, got {n_gen}")
    extractor = _rank0_first(lambda: _extractor(args, settings, base, size, log), rank, world, device).to(device)
    reference, idx, ref_record = _reference(args, settings, size)
    if len(idx) < 2:
        raise UserError(f"{args.data}: FID needs at least 2 reference images, got {len(idx)}")
    f_gen = _all_features(extractor, batches, world, device)
    start, stop = batch_aligned_share(len(idx), args.batch_size, rank, world)
    f_ref = _all_features(extractor, image_batches(reference, idx[start:stop], args.batch_size), world, device)
    return dict(settings=settings, source=source, features=extractor.name, f_gen=f_gen, f_ref=f_ref, what=what,
                gen_record=gen_record, ref_record=ref_record, t0=t0)


def _report_fid(args, r: dict, world: int) -> None:
    """FID, KID (and precision/recall) of the gathered features: printed, and written to --json."""
    import sys

    from fastdiff.metrics import fid_from_features, kid, precision_recall
    from fastdiff.metrics.pipeline import describe_subset

    settings, gen_record, ref_record, f_gen, f_ref = (r[k] for k in ("settings", "gen_record", "ref_record",
                                                                     "f_gen", "f_ref"))
    n_gen = len(f_gen)
    fid = fid_from_features(f_ref, f_gen)
    n_ref, dim = len(f_ref), int(f_gen.shape[1])
    quantized = gen_record.pop("quantized")
    warnings = [w for w in (gen_record.pop("warning", None), _small_n_warning(n_gen, n_ref, dim)) if w]
    result = {"fid": fid, "features": r["features"], "feature_dim": dim, "source": str(r["source"]),
              "n_generated": n_gen, "data": args.data, "split": settings["split"], "n_reference": n_ref,
              "reference_subset": ref_record, "generated_subset": gen_record, "protocol": args.protocol,
              "quantize": quantized, "reference_resize": settings["reference_resize"], "warnings": warnings,
              "ranks": world}
    line = (f"FID: {fid:.4f} ({r['features']}, {n_gen} generated vs {n_ref} {args.data} {settings['split']} "
            f"images: {describe_subset(ref_record)}; samples quantised: {quantized}, reference "
            f"resize {settings['reference_resize']}" + (f"; protocol {args.protocol}" if args.protocol else "") + ")")
    if args.kid:
        subset = min(args.kid_subset_size, n_gen, n_ref)
        kid_mean, kid_std = kid(f_ref, f_gen, subsets=args.kid_subsets, subset_size=subset, seed=args.subset_seed)
        result.update(kid=kid_mean, kid_std=kid_std, kid_subsets=args.kid_subsets, kid_subset_size=subset)
        line += f"\nKID: {kid_mean:.6f} ± {kid_std:.6f} (std over {args.kid_subsets} subsets of {subset})"
    if args.precision_recall:
        precision, recall = precision_recall(f_ref, f_gen, k=3)
        result.update(precision=precision, recall=recall)
        line += f"\nprecision: {precision:.4f}, recall: {recall:.4f} (k=3)"
    result["seconds"] = round(time.time() - r["t0"], 2)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    ranks = f"; features on {world} ranks" if world > 1 else ""
    print(line + f"\n({r['what']}{ranks}; {result['seconds']:.1f}s)")
    if args.json:
        from fastdiff.io import atomic_write_bytes
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(result, indent=1).encode())


# --------------------------------------------------------------------------- eval bpd
def cmd_eval_bpd(a: argparse.Namespace) -> int:
    import math

    import torch

    from fastdiff.data import load_dataset
    from fastdiff.sampling import space_timesteps

    if a.ode and not (math.isfinite(a.rtol) and a.rtol > 0):
        raise UserError(f"--rtol must be a finite number > 0, got {a.rtol}")
    if a.ode and a.steps is not None:
        raise UserError("--steps respaces the variational bound; --ode chooses its own steps (--rtol)")
    check_json_output(a.json)
    model, origin = load_for_sampling(a.dir, a.no_ema)
    latent = hasattr(model, "decode_latents")  # a LatentDiffusionModel: the bound is on its latents
    if latent and a.ode:
        raise UserError("--ode dequantises 8-bit pixels; a latent model's likelihood is of continuous latents: use the "
                        "variational bound (without --ode)")
    d = model.diffusion
    steps = a.steps or d.T
    if steps > d.T:
        raise UserError(f"--steps {steps} exceeds the model's T={d.T}")
    if steps < d.T:
        d = d.respace(space_timesteps(d.T, steps, "uniform"))
    shape = image_shape(model)
    ds = load_dataset(a.data, image_size=shape[-1], train=a.split == "train", seed=0)
    if ds.shape[0] != shape[0]:
        raise UserError(f"{a.data}: {ds.shape[0]}-channel images, but the model takes {shape[0]}")
    n = min(a.n, len(ds))
    gen = torch.Generator().manual_seed(a.seed)
    totals = []
    t0 = time.time()
    nfe = 0
    for start in range(0, n, a.batch_size):
        x, _ = ds.batch(range(start, min(n, start + a.batch_size)))
        if latent:  # the scaled posterior means: the latents the model is a law of
            x = model.encode_images(x)
        if a.ode:  # docs/score-based.md section 5: dequantised, Hutchinson divergence, RK45
            from fastdiff.sampling.likelihood import ode_nll_bpd
            res = ode_nll_bpd(model, x, model.diffusion, divergence="hutchinson", rtol=a.rtol, atol=a.rtol,
                              seed=a.seed + start, generator=gen)
            nfe += res["nfe"]
        else:
            # latents are not data in [-1, 1]: their predicted x0 is not clipped
            res = d.nll_bpd(model, x, clip_denoised=not latent, generator=gen, progress=not a.no_progress)
        totals.append(res["total_bpd"].double())
    bpd = torch.cat(totals)
    mean = bpd.mean().item()
    half = 1.96 * bpd.std().item() / math.sqrt(n) if n > 1 else float("nan")
    what = f"T={d.T}" + (f" (respaced from {model.diffusion.T})" if d.T != model.diffusion.T else "")
    if a.ode:
        what = f"probability-flow ODE, rtol {a.rtol:g}, {nfe} network evaluations"
    if latent:
        c, h, w = model.sample_shape
        print(f"bits/dim of the latents, a bound on the latent likelihood, not on pixels: {mean:.4f} ± {half:.4f} "
              f"(95% CI; n={n}, {what}, {a.split} split, {origin}, {time.time() - t0:.1f}s; per dimension of the "
              f"{c}x{h}x{w} latents, the scaled posterior means of the images, with the decoder term discretised at "
              f"the 8-bit bin width 2/255; not comparable with a pixel model's bits/dim)")
    else:
        print(f"bits/dim: {mean:.4f} ± {half:.4f} (95% CI; n={n}, {what}, {a.split} split, {origin}, "
              f"{time.time() - t0:.1f}s)")
    if a.json:
        Path(a.json).write_text(json.dumps({"bpd": mean, "ci95": half, "n": n, "T": d.T, "split": a.split,
                                            "source": a.dir, "method": "ode" if a.ode else "vlb",
                                            "space": "latent" if latent else "pixel"}, indent=1))
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run", description="Evaluate a trained run.")
    esub = p.add_subparsers(dest="metric", metavar="METRIC")
    esub.required = True
    e = esub.add_parser("bpd", help="bits/dim (variational bound) with a 95%% confidence interval",
                        description="Bits/dim by the full variational bound: T model evaluations per batch. "
                        "--steps S evaluates the bound of the process respaced to S steps (an upper bound "
                        "that is looser than the full one, but S/T of the cost).")
    e.add_argument("dir", help="run folder (holding checkpoint.json) or exported model file")
    e.add_argument("--data", required=True, help="dataset, as for train")
    e.add_argument("--n", type=positive_int, default=256, help="number of images (default: 256)")
    e.add_argument("--steps", type=positive_int, default=None, help="respaced process length (default: T)")
    e.add_argument("--batch-size", type=positive_int, default=64)
    e.add_argument("--split", choices=("test", "train"), default="test",
                   help="held-out split where the dataset has one (default: test)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--no-ema", action="store_true")
    e.add_argument("--json", default=None, help="also write the result to this JSON file")
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--ode", action="store_true",
                   help="bits/dim through the probability-flow ODE (uniform dequantisation, Hutchinson divergence; "
                   "docs/score-based.md) instead of the variational bound")
    e.add_argument("--rtol", type=float, default=1e-5, help="--ode: the ODE solver's rtol and atol (default: 1e-5)")
    e.set_defaults(func=cmd_eval_bpd)
    _add_fid_parser(esub)
