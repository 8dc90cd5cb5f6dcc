"""The run configuration's schema: one pydantic model per YAML section, defaults in one place.

Every section forbids unknown keys, so a misspelled key is an error that names it. Reading,
overriding and writing configs is :mod:`alast.config`, which also exports these models.
"""
from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class ConfigError(ValueError):
    """The configuration is missing, unreadable or invalid; the message says what to fix."""


def _types_of(annotation: Any) -> set[Any]:
    """The plain types an annotation admits (``int | None`` -> {int, NoneType}; Literal values kept)."""
    args = typing.get_args(annotation)
    if not args:
        return {annotation}
    if typing.get_origin(annotation) is Literal:
        return set(args)
    return set().union(*(_types_of(a) for a in args))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # no NaN or inf setting

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        """Refuse true/false for a number (pydantic's lax mode reads ``steps: true`` as 1 step)."""
        if isinstance(v, bool) and info.field_name is not None:
            types = _types_of(cls.model_fields[info.field_name].annotation)
            if bool not in types and types & {int, float}:
                raise ValueError("a number is expected, not true or false")
        return v


class ModelConfig(_Section):
    name: str = Field("alast_demo_vit", description="timm model name, or 'alast_demo_vit' / 'alast_vit12' (alast's own)")
    pretrained: bool | None = Field(
        None, description="start from pretrained weights: timm's download (needs internet) or, for "
        "alast_demo_vit/alast_vit12, the shipped backbone; default: yes for those, no otherwise")
    checkpoint: Path | None = Field(None, description="local weights (.safetensors/.pth/.pt/.bin) to start from, "
                                                      "or a directory holding one")
    checkpoint_ema: bool = Field(False, description="start from the EMA weights model.checkpoint holds beside its "
                                 "trained ones (timm train.py's state_dict_ema, DeiT's model_ema) instead of those")
    img_size: int | None = Field(None, gt=0, description="input size; default: the model's own")
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0, description="stochastic depth rate passed to timm when "
                                  "the model is built (0: off)")

    @field_validator("checkpoint")
    @classmethod
    def _one_source(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        # a new run's config only: runs that recorded both load as they trained (from the checkpoint)
        if v is not None and info.data.get("pretrained") is True and (info.context or {}).get("new"):
            raise ValueError("model.pretrained=true and model.checkpoint both name the starting weights (the "
                             "checkpoint would win); pass one of them")
        return v

    @field_validator("checkpoint_ema")
    @classmethod
    def _ema_of_a_checkpoint(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("checkpoint") is None and "checkpoint" in info.data:
            raise ValueError("loads the EMA weights of model.checkpoint, and no checkpoint is given; pass "
                             "--checkpoint FILE, or drop model.checkpoint_ema")
        return v


class LoraConfig(_Section):
    """``policy.lora``: the adapters of the LoRA policies (``lora``, ``alast+lora``, any ``+lora``)."""

    rank: int = Field(8, ge=1, description="rank r of each adapter: it trains r x (inputs + outputs) numbers "
                      "per adapted layer")
    alpha: float = Field(16.0, gt=0, description="scale: an adapter's update is multiplied by alpha / rank")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapters' input in training")
    targets: list[str] = Field(
        default_factory=lambda: ["qkv"], description="the Linear layers inside each block to adapt, by name: "
        "qkv, proj, fc1, fc2 in a timm ViT (a dotted name such as attn.proj too); matched inside the blocks only. "
        "The classifier heads train in full, the rest of the model stays frozen")

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("is empty, so LoRA would adapt nothing; name Linear layers inside the blocks, "
                             "e.g. [qkv] or [qkv, proj, fc1, fc2]")
        return v


class DataConfig(_Section):
    spec: str = Field("digits", description="digits | shapes | letters | imagefolder:PATH | torchvision:NAME | "
                      "random[:N] (N random images, default 256, 10 classes: timing only)")
    data_dir: Path | None = Field(None, description="root directory for torchvision datasets")
    download: bool = Field(False, description="let torchvision download the dataset (needs internet)")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="held-out share when the data has no split")
    tune_fraction: float | None = Field(
        None, gt=0.0, lt=1.0, description="hold this share of the training images out (stratified by class, drawn "
        "by train.seed), train on the rest and score on them instead of on the validation split: for choosing "
        "settings, such as the learning rate (alast bench --lrs), without looking at the validation images")
    tune_outside_seeds: list[int] = Field(
        default_factory=list, description="with data.tune_fraction, where the validation split is drawn by the "
        "seed (digits, an image folder without a validation folder, a torchvision set without splits): hold out "
        "none of these seeds' validation images either (alast bench --lrs: every seed of the bench)")
    num_workers: int | Literal["auto"] = Field(
        "auto", description="DataLoader worker processes for the training and validation batches; 0: load them in "
        "the training process; auto: none on the CPU (the training threads use its cores), on CUDA one per CPU core "
        "each training process has, less one, up to 8")
    cache: bool | Literal["auto"] = Field(
        "auto", description="keep each image, once read and transformed, in memory (8 bits a value, exact) so "
        "later epochs and evaluations skip the decode and the resize; not the training images under data.augment. "
        "auto: where they fit in a quarter of the memory available; true: wherever they fit; false: never")
    skip_bad_images: bool = Field(False, description="skip unreadable images (counted) instead of failing")
    augment: bool = Field(False, description="timm training augmentation instead of the eval transform")
    train_split: str | None = Field(
        None, min_length=1, description="torchvision:NAME: the split to train on (its split argument); default: "
        "per dataset (train, trainval for FGVCAircraft and OxfordIIITPet, train-standard for Places365)")
    val_split: str | None = Field(
        None, min_length=1, description="torchvision:NAME: the split to validate on; default: test, or val "
        "where there is none (ImageNet, Places365, Imagenette)")
    subset: str | None = Field(
        None, min_length=1, description="torchvision:NAME whose split argument names a subset beside a train "
        "flag: EMNIST's byclass, bymerge, balanced, letters, digits or mnist")


EARLY_FRAC = 0.3  # policy.early_frac's default with freeze_mode 'last'


TOKEN_TEMPERATURE = 0.5  # policy.token_temperature's default


class PolicyConfig(_Section):
    name: str = Field("alast", description="alast | full | freeze | tokens | random | lora (full fine-tuning "
                      "through LoRA adapters) | X+lora (policy X with LoRA adapters, e.g. alast+lora)")
    rule: Literal["normalized", "paper"] = Field(
        "normalized", description="alast budget rule: 'normalized' (scale-free, the default) or 'paper' (the "
        "literal b += alpha * (delta - delta_prev), whose step depends on the model's activation scale)")
    gain: float = Field(0.1, ge=0.0, description="normalized rule: budget gap per doubling of a block's share "
                        "of the CLS change, relative to the other blocks")
    ema: float = Field(0.9, ge=0.0, lt=1.0, description="normalized rule: smoothing of the per-block shares")
    alpha: float | None = Field(None, ge=0.0, description="paper rule: budget step size; default: train.lr")
    b_init: float = Field(0.9, gt=0.0, le=1.0, description="alast: every block's budget (keep ratio) at the "
                          "start, and the level the normalized rule moves the budgets around; in [b_min, b_max]")
    b_min: float = Field(0.5, gt=0.0, le=1.0, description="alast: the lowest a budget can go (clip bound)")
    b_max: float = Field(1.0, gt=0.0, le=1.0, description="alast: the highest a budget can go (clip bound)")
    k_trained: int | None = Field(None, ge=1, description="blocks trained per step; default 9 of 12: "
                                     "round(0.75 L), halves rounded down with freeze_mode 'last' (4 of 6)")
    freeze_mode: Literal["sample", "topk", "last"] = Field(
        "last", description="alast: which blocks train each step: 'last', the top k_trained blocks (beyond the "
        "paper: with the embeddings frozen the backward stops below them, and the budgets set the tokens); "
        "'sample', k_trained drawn from softmax(budgets) (the paper); 'topk', the k_trained highest budgets")
    delta_reduction: Literal["mean", "sum"] = Field(
        "mean", description="how each block's per-image class-token changes are reduced over the batch for the "
        "budget rule: 'mean' or 'sum'")
    min_tokens: int = Field(1, ge=1, description="the fewest patch tokens a block that drops tokens keeps (or "
                            "all of them if fewer remain)")
    dense_final_frac: float = Field(
        0.0, ge=0.0, lt=1.0, description="alast, beyond the paper: share of final steps that keep every token "
        "and train only the top blocks (policy.dense_final_blocks); 0 (the default): none, as in the paper")
    dense_final_blocks: int | Literal["auto", "sampled"] = Field(
        "auto", description="alast: blocks the dense final phase trains: the top N, with the embeddings frozen so "
        "the backward stops at them (few FLOPs, little memory; 'auto': a quarter of the depth), or 'sampled': "
        "k_trained blocks drawn as in the other steps, with the embeddings")
    dense_final_interleave: int = Field(
        2, description="alast, beyond the paper: one step in N of the dense final phase is a sparse step (the "
        "k_trained blocks, budgets as keep ratios), so the blocks below the phase's top ones train to the end; under "
        "a target it costs what a dense step costs and peaks no higher, so the other steps keep their tokens; "
        "true: 2 (every other step); false or 0: every step of the phase is dense")
    early_frac: float | None = Field(
        None, ge=0.0, lt=1.0, description="alast with freeze_mode 'last', beyond the paper (progressive freezing, "
        "as in FreezeOut): share of the first steps that also train the block below the top k_trained ones, "
        "which then stays frozen; under a target those steps spend at most the others' FLOPs and peak no "
        "higher in memory than they do at each device's batch (fewer tokens each), and the others pay for the "
        f"difference; without one they cost one trained block more; default: {EARLY_FRAC:g} under a FLOPs "
        "target with freeze_mode 'last', else 0 (off)")
    spare_first: int | Literal["frozen"] = Field(
        "frozen", description="alast, beyond the paper: the first N blocks keep every token (dropping starts "
        "after them; under a target the other blocks pay for it); 'frozen': with freeze_mode 'last', the "
        "frozen blocks below the trained ones (their budgets stay at b_init, a token costs them a forward "
        "only, and a token they drop is lost to every trained block above)")
    fuse_tokens: bool = Field(False, description="beyond the paper (EViT): the dropped tokens of each block are fused "
                              "into one token, their score-weighted mean, which takes the last kept slot (same cost)")
    token_score: Literal["attention", "contribution"] = Field(
        "contribution", description="what ranks a block's patch tokens: 'attention', the class token's "
        "attention to them averaged over heads (the paper); 'contribution', beyond the paper, that attention "
        "times the norm of the token's value vector, per head: the size of what the token adds to the class "
        "token")
    token_select: Literal["top", "sample", "random"] = Field(
        "sample", description="which patch tokens a block keeps in training: 'top', the highest scores (the "
        "paper); 'sample', beyond the paper, drawn anew each step without replacement with probability "
        "proportional to the score; 'random', a uniform random subset. Evaluation on a token schedule keeps "
        "the highest scores")
    token_temperature: float = Field(
        TOKEN_TEMPERATURE, gt=0.0, description="token_select 'sample', beyond the paper: the kept tokens are "
        "drawn with probability proportional to score ** (1 / T); below 1 the draw leans to the top scores "
        "(towards 'top'), above 1 towards a uniform draw ('random'); 1: in proportion to the score")
    trim_last: bool = Field(
        True, description="alast, beyond the paper: where the model's head reads only the class token (and the "
        "other prefix tokens), the last block keeps none of its patch tokens in training (policy.min_tokens of "
        "them), dense final phase included: their outputs are never read, and the torch backend then computes "
        "the last block for the kept tokens only. Logits, deltas and gradients are unchanged; under a FLOPs "
        "target the saving buys tokens in the other blocks")
    freeze_embeddings: bool | None = Field(
        None, description="beyond the paper: keep everything that feeds block 0 (patch embedding, class, register "
        "and distillation tokens, position embedding, pre-norm) frozen, so blocks below the lowest trained block "
        "need no backward pass at all; default: frozen for alast with freeze_mode 'last', trained otherwise")
    eval_tokens: Literal["auto", "trained", "all"] = Field(
        "auto", description="how a model trained with token dropping is evaluated and exported: 'trained' on its "
        "token schedule (after each block, as many tokens as the final 10% of training steps kept: the model runs "
        "as it was trained, and inference costs fewer FLOPs); 'all' on every token; 'auto' measures both at the "
        "end and keeps the more accurate on the validation data (the schedule on a tie)")
    keep_ratio: float | list[float] = Field(
        0.8, description="'tokens' policy (static token dropping): the share of the patch tokens it receives "
        "that each block keeps (dropping is cumulative), one number for every block or one per block; under a "
        "FLOPs target the solver chooses it")
    target_flops: float | None = Field(None, gt=0.0, le=1.0, description="fraction of full fine-tuning FLOPs")
    lora: LoraConfig | None = Field(
        None, description="the LoRA adapters' settings (rank, alpha, dropout, targets); only for the LoRA "
        "policies (lora, X+lora), which get the defaults when it is unset")

    @field_validator("dense_final_interleave", mode="before")
    @classmethod
    def _interleave(cls, v: Any) -> Any:
        from planners.rules import interleave_period

        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        try:
            if v is None:
                raise ValueError
            return interleave_period(v)
        except ValueError:
            raise ValueError("must be a period N >= 2 (one step in N of the dense final phase is sparse), "
                             "true (2) or false (0)") from None

    @field_validator("spare_first", mode="before")
    @classmethod
    def _spare_first(cls, v: Any) -> Any:
        if v == "frozen" or (type(v) is int and v >= 0):
            return v
        if isinstance(v, str) and v.strip().isdigit():
            return int(v)
        raise ValueError("must be a number of blocks (0 or more) or 'frozen'")

    @property
    def embeddings_frozen(self) -> bool:
        """``freeze_embeddings``, resolved: unset means frozen exactly when alast trains the last blocks."""
        if self.freeze_embeddings is not None:
            return self.freeze_embeddings
        return self.planner == "alast" and self.freeze_mode == "last"

    @property
    def planner(self) -> str:
        """The registered planner behind this policy name ('lora' is full fine-tuning with LoRA)."""
        if self.name == "lora":
            return "full"
        return self.name.removesuffix("+lora")

    @property
    def early_phase(self) -> float:
        """``early_frac``, resolved: unset means :data:`EARLY_FRAC` under a FLOPs target with freeze_mode
        'last' (the target's cost model holds the phase's FLOPs and memory), else 0."""
        if self.early_frac is not None:
            return self.early_frac
        return EARLY_FRAC if self.freeze_mode == "last" and self.target_flops is not None else 0.0

    @model_validator(mode="after")
    def _early_phase(self) -> PolicyConfig:
        if self.planner == "alast" and self.early_phase:
            if self.freeze_mode != "last":
                raise ValueError(f"early_frac trains the block below the top k_trained ones: it needs "
                                 f"freeze_mode 'last', not {self.freeze_mode!r}")
            if self.early_phase + self.dense_final_frac >= 1.0:
                raise ValueError(f"early_frac ({self.early_phase:g}) and dense_final_frac ({self.dense_final_frac:g}) "
                                 "must leave steps between them: their sum must stay below 1; lower either")
        return self

    @model_validator(mode="after")
    def _temperature_for_draws(self) -> PolicyConfig:
        # the default, and 1 (what a run saved before the key existed trained with), are neutral anywhere
        if self.token_select != "sample" and self.token_temperature not in (1.0, TOKEN_TEMPERATURE):
            raise ValueError(f"policy.token_temperature={self.token_temperature:g} shapes the draws of token_select "
                             f"'sample', not {self.token_select!r}; drop it, or set policy.token_select=sample")
        return self

    @model_validator(mode="after")
    def _lora_default(self) -> "PolicyConfig":
        if (self.name == "lora" or self.name.endswith("+lora")) and self.lora is None:
            self.__dict__["lora"] = LoraConfig()
        return self


class BackendConfig(_Section):
    name: Literal["torch", "ort"] = Field("torch", description="the training backend: 'torch' (PyTorch) or "
                                          "'ort' (ONNX Runtime Training)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where to train: 'auto' is CUDA where it is visible (for ort: to both ONNX Runtime "
        "and torch), else the CPU")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="bf16 autocast: on a CUDA GPU with bf16 (Ampere or later), or on a CPU with bf16 "
        "matrix instructions (AVX-512 BF16 or AMX); fp16 autocast with loss scaling: on CUDA (a T4, a V100)")
    count_flops: Literal["every", "off"] = Field(
        "every", description="count each step's FLOPs with torch.utils.flop_counter (once per block "
        "shape; torch solves most new shapes exactly from counted ones), or not at all"
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: torch's choice")
    compile: bool = Field(False, description="torch: torch.compile the block compute (every policy, "
                          "full fine-tuning included); token counts are dynamic, so budgets do not recompile")
    token_multiple: int = Field(1, ge=1, description="round each kept token count down to a multiple of "
                                "this (8 suits GPU tensor cores; never below policy.min_tokens); 1: exact")
    sync_free: Literal["auto", "on", "off"] = Field(
        "auto", description="torch: read each step's loss and deltas one step late, so the host never "
        "waits on the device (the planner sees step i when planning step i+2); auto: on for CUDA")
    frozen_cache: Literal["auto", "on", "off"] = Field(
        "auto", description="torch: keep what the frozen embeddings and bottom blocks compute for each training "
        "image (alast's freeze_mode last; the freeze policy with policy.freeze_embeddings=true), so a later "
        "epoch starts above them; under a FLOPs target the saving buys tokens. auto: on where it applies (one "
        "process, no data.augment, no micro-batches) on the CPU, off on a GPU (it would take device memory); on: "
        "also on a GPU, in its memory; refuse where it cannot apply")
    frozen_cache_mib: float = Field(
        4096, gt=0, description="memory the frozen blocks' cache may take, per process, on the training device (on "
        "a GPU it counts in the peak); images past it are computed every time")

    @field_validator("count_flops", mode="before")
    @classmethod
    def _yaml_booleans(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `off` as False and `on` as True.
        return {False: "off", True: "every"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("sync_free", "frozen_cache", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        return {False: "off", True: "on"}.get(v, v) if isinstance(v, bool) else v


class TrainConfig(_Section):
    steps: int | None = Field(150, ge=1, description="training steps (one batch each); null with epochs")
    epochs: float | None = Field(None, gt=0, description="training epochs instead of steps: steps = "
                                 "ceil(epochs x (training images // batch_size)); set steps to null with it")
    batch_size: int = Field(64, ge=1, description="global batch size: with --nproc N each process trains on "
                            "batch_size / N images per step")
    micro_batch_size: int | None = Field(
        None, ge=1, description="gradient accumulation: the most images one forward and backward pass takes on "
        "a process; a step of more runs several passes, adds up their gradients and updates once (the same "
        "step, with the activation memory of this many images). null: the whole per-process batch in one pass")
    lr: float = Field(1e-3, gt=0.0, description="peak learning rate of AdamW (linear warm-up, then cosine "
                      "decay); also the paper rule's budget step when policy.alpha is unset")
    weight_decay: float = Field(0.05, ge=0.0, description="AdamW weight decay (none on 1-D parameters and on "
                                "timm's no_weight_decay() names)")
    warmup_frac: float = Field(0.1, ge=0.0, lt=1.0, description="share of the steps over which the learning "
                               "rate rises linearly to lr")
    min_lr_frac: float = Field(0.01, ge=0.0, le=1.0, description="the learning rate the cosine decay ends at, "
                               "as a fraction of lr")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="label smoothing of the cross-entropy loss")
    grad_clip: float | None = Field(1.0, gt=0.0, description="clip the gradients' global norm to this; null: "
                                    "no clipping")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: only at the end)")
    eval_batch_size: int | None = Field(
        None, ge=1, description="validation batch size; default: the most images whose input tensor fits "
        "in 8 MiB, between 1 and 256 (results do not depend on it)")
    seed: int = Field(0, description="random seed: new weights (the classifier head), the data's validation "
                      "split and batch order, the policies' draws (ALaST's token draws: seed plus the rank)")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms (warn only where an op "
                                "has no deterministic version)")


class OutputConfig(_Section):
    dir: Path | None = Field(None, description="run directory; default runs/<time>-<policy>")
    checkpoint_every: int = Field(0, ge=0, description="also write a checkpoint every N steps; 0: by "
                                  "checkpoint_minutes only")
    checkpoint_minutes: float | None = Field(
        10.0, gt=0, description="also write a checkpoint about every N minutes of training (the step count "
        "is fixed from the first steps' median time, on every rank alike), so a killed run loses at most that; "
        "null: only at the end of training and on Ctrl-C/SIGTERM")
    keep_last: int = Field(2, ge=1, description="how many of the newest checkpoints to keep; older ones are "
                           "removed when a new one is written")
    force: bool = Field(False, description="replace the run in an existing non-empty run dir: the files alast "
                        "wrote there (checkpoints, metrics, results) are removed, any others kept")
    tensorboard: bool = Field(False, description="also write TensorBoard event files to RUN_DIR/tensorboard "
                              "(pip install 'alast[tensorboard]')")


# The lowest ONNX opset an export can use: the first with scaled_dot_product_attention (timm's fused
# attention) in the exporter. The highest depends on the installed torch and onnxruntime
# (alast.export.supported_opsets), so only an export can check it.
MIN_OPSET = 14


class ExportConfig(_Section):
    opset: int = Field(17, description="ONNX opset; the highest one an export can use depends on the installed "
                       "torch and onnxruntime (`alast export` says which)")
    atol: float = Field(1e-4, gt=0.0, allow_inf_nan=False,
                        description="max |logit difference| of the ONNX model vs PyTorch")

    @field_validator("opset")
    @classmethod
    def _opset(cls, v: int, info: ValidationInfo) -> int:
        # A new run's config (see build_config) is held to the exporter's lower bound; a run's saved
        # config is read as written, and `alast export` names its opset if it cannot use it.
        if (info.context or {}).get("new") and v < MIN_OPSET:
            raise ValueError(f"must be {MIN_OPSET} or more (timm's attention needs opset {MIN_OPSET})")
        return v


class AlastConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    backend: BackendConfig = Field(default_factory=BackendConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @field_validator("backend")
    @classmethod
    def _lora_backend(cls, v: BackendConfig, info: ValidationInfo) -> BackendConfig:
        # Here, not only where the ort runtime is built, so that `alast plan` and each policy of
        # `alast bench` are refused too, before anything is profiled or trained.
        p = info.data.get("policy")
        if v.name == "ort" and p is not None and (p.name == "lora" or p.name.endswith("+lora")):
            raise ValueError(f"the ort backend does not support LoRA (policy {p.name!r}); use --backend torch")
        return v

    @model_validator(mode="after")
    def _check(self) -> "AlastConfig":
        p = self.policy
        if p.b_min > p.b_max:
            raise ValueError(f"policy.b_min={p.b_min} is above policy.b_max={p.b_max}: no budget lies between them; "
                             "swap them")
        if not p.b_min <= p.b_init <= p.b_max:
            raise ValueError(f"policy.b_init={p.b_init} must lie in [policy.b_min, policy.b_max] = [{p.b_min}, {p.b_max}]")
        t = self.train
        if t.micro_batch_size is not None and t.micro_batch_size > t.batch_size:
            raise ValueError(f"train.micro_batch_size={t.micro_batch_size} is above train.batch_size={t.batch_size}: a "
                             f"pass cannot take more images than the step has; lower it, or raise the batch size")
        return self
