"""Train an IRM on alignment text while the host model stays frozen; checkpoints and resume.

A run directory holds everything needed to continue after an interruption:

    run.json                         what was trained on what (provenance)
    metrics.jsonl                    one line per step (loss), one per evaluation (val loss)
    metrics.csv                      the same, written when training ends
    irm.safetensors                  the best IRM so far (lowest validation loss)
    checkpoints/step-0000100.safetensors   IRM + Adam + StepLR + loop state, one atomic file
    latest.json                      which checkpoint is the newest complete one

Resuming from a checkpoint gives the same IRM as an uninterrupted run: the data order of each
epoch is a pure function of (seed, epoch), and everything else that evolves is in the checkpoint.

Under ``torchrun`` the same function trains data-parallel (``irm_lens.distributed``): the same
global batches, gradients averaged by DDP, files written by rank 0, resumable with another
number of processes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from irm_lens._io import _ensure_writable_dir, atomic_write, atomic_write_json, atomic_write_text
from irm_lens._progress import progress_bar
from irm_lens.data.corpora import load_alignment, neutral_prompts
from irm_lens.data.dataset import (
    TextSplits,
    TokenizedTexts,
    batch_slice,
    split_texts,
    tokenize_texts,
)
from irm_lens.distributed import Ranks
from irm_lens.errors import CheckpointError, ConfigError, check_config_keys
from irm_lens.inject import inject
from irm_lens.irm import IRM, IRMConfig
from irm_lens.losses import logits_at, predicting
from irm_lens.objectives import (
    OBJECTIVES,
    Batch,
    LMObjective,
    PreferenceObjective,
    build_objective,
    entropy_shortfall,
    kl_batch,
    kl_to_unsteered,
)

logger = logging.getLogger(__name__)

PAPER_L1 = 1e-4  # the paper's coefficient, divided by the number of injected layers
_FORMAT = "irm_lens-train-1"
# Fields that may change between an interrupted run and its resumption.
_RESUMABLE_CHANGES = {"max_steps", "max_epochs", "patience", "checkpoint_every", "keep_checkpoints"}


@dataclass(frozen=True)
class TrainConfig:
    """How to train an IRM. Defaults follow the paper where it says.

    Attributes:
        lr: Adam learning rate (paper: 1e-4).
        batch_size: Sequences per step, over all processes when distributed (the global
            batch; paper: 8 per GPU on 2 GPUs).
        max_length: Tokens per sequence, BOS included (paper: 128).
        max_epochs: Upper bound on epochs (paper: 15).
        max_steps: Upper bound on optimizer steps (None: epochs decide).
        lr_gamma: StepLR decay factor (paper: 0.85 per epoch).
        lr_step_size: Steps between decays (None: once per epoch).
        l1: Coefficient of the L1 penalty on the IRM's outputs: ``l1`` times the per-token sum
            of ``|output|`` over injected layers and residual indices, averaged over tokens.
            The paper used 1e-4 / n_injected_layers: see ``paper_l1``.
        eval_every: Steps between validation passes (None: once per epoch).
        patience: Validation passes without improvement before stopping early (paper: 6).
        max_val_batches: Cap on validation batches per pass (None: the whole split).
        checkpoint_every: Steps between checkpoints (one is always written at the end).
        keep_checkpoints: How many step checkpoints to keep on disk (0: every one, for
            ``analysis.dynamics.dominance_curve`` along the run).
        seed: Seeds the data split and the data order (paper: 42).
        grad_clip: Max gradient norm (None: no clipping, as the paper).
        chat_prompts: Train on chat examples: each plain text becomes the assistant's reply
            to a neutral prompt (``neutral_prompts(split="train")``, disjoint from the
            evaluation prompts) in the model's chat template, and only the reply is scored.
            Off: plain text, as the paper. ``(prompt, reply)`` examples are always replies to
            their own prompt.
        objective: ``"lm"`` (the paper: cross-entropy on the alignment's texts) or
            ``"preference"`` (DPO on ``(prompt, chosen, rejected)`` pairs against the unsteered
            model; see ``irm_lens.objectives``).
        beta: The preference objective's inverse temperature (DPO's beta).
        chosen_lm: Weight of the chosen replies' cross-entropy added to the preference loss.
        kl: Weight of the fluency term: KL(unsteered || steered) next-token distributions on the
            built-in ``neutral`` texts, one batch of them per step (0: off).
        entropy: Weight of the diversity term: the steered next-token entropy's shortfall below
            the unsteered model's where the training replies are predicted
            (``objectives.entropy_shortfall``; 0: off).
    """

    lr: float = 1e-4
    batch_size: int = 8
    max_length: int = 128
    max_epochs: int = 15
    max_steps: int | None = None
    lr_gamma: float = 0.85
    lr_step_size: int | None = None
    l1: float = 0.0
    eval_every: int | None = None
    patience: int = 6
    max_val_batches: int | None = None
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 42
    grad_clip: float | None = None
    chat_prompts: bool = False
    objective: str = "lm"
    beta: float = 0.1
    chosen_lm: float = 0.0
    kl: float = 0.0
    entropy: float = 0.0

    def __post_init__(self) -> None:
        positive = ("batch_size", "max_length", "max_epochs", "patience", "checkpoint_every")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"TrainConfig.{name} must be a positive int, got {value!r}.")
        keep = self.keep_checkpoints
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ConfigError(
                f"TrainConfig.keep_checkpoints must be a non-negative int (0 keeps every "
                f"checkpoint), got {keep!r}."
            )
        for name in ("max_steps", "lr_step_size", "eval_every", "max_val_batches"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"TrainConfig.{name} must be None or a positive int, got {value!r}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"TrainConfig.lr must be a positive number, got {self.lr!r}.")
        if not 0 < self.lr_gamma <= 1:
            raise ConfigError(f"TrainConfig.lr_gamma must be in (0, 1], got {self.lr_gamma!r}.")
        for name in ("l1", "chosen_lm", "kl", "entropy"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"TrainConfig.{name} must be a non-negative number, got {value!r}.")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ConfigError(f"TrainConfig.beta must be a positive number, got {self.beta!r}.")
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"TrainConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}."
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        check_config_keys(cls, d, "TrainConfig")
        return cls(**d)


def paper_l1(irm_config: IRMConfig) -> float:
    """The paper's L1 coefficient for this IRM: 1e-4 / number of injected layers."""
    return PAPER_L1 / irm_config.n_injected


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        irm: The IRM with the lowest validation loss (the final one if never validated).
        out_dir: The run directory (None for an in-memory run).
        steps: Optimizer steps taken in total.
        best_step: Step of the best validation loss.
        best_val_loss: Lowest validation loss (mean token cross-entropy, nats).
        baseline_val_loss: Validation loss of the model without the IRM.
        stop_reason: Why training ended.
        history: One row per step (``loss``) and per evaluation (``val_loss``).
        wall_time_s: Seconds spent in this call.
    """

    irm: IRM
    out_dir: Path | None
    steps: int
    best_step: int
    best_val_loss: float
    baseline_val_loss: float
    stop_reason: str
    history: pd.DataFrame
    wall_time_s: float

    @property
    def val_perplexity(self) -> float:
        return math.exp(self.best_val_loss)

    @property
    def baseline_val_perplexity(self) -> float:
        return math.exp(self.baseline_val_loss)


@dataclass
class _LoopState:
    step: int = 0
    best_val_loss: float = math.inf
    best_step: int = -1
    bad_evals: int = 0
    baseline_val_loss: float = math.nan
    stop_reason: str = ""


def train(
    model: HookedTransformer,
    irm: IRM,
    data: TextSplits | Iterable[str] | str,
    config: TrainConfig = TrainConfig(),
    *,
    out_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Train ``irm`` so that ``model`` with the IRM injected fits ``data``; the model stays frozen.

    Args:
        model: The frozen host model.
        irm: The IRM to train, in place (its initial weights are the caller's: seed before
            building it).
        data: Pre-split ``TextSplits``; texts and/or ``(prompt, reply)`` chat examples (split
            90/5/5 with ``config.seed``; a chat example's reply is scored as the answer to its
            own prompt); or the name of a built-in alignment (``"anger"``, ...).
        config: Hyper-parameters.
        out_dir: Run directory for metrics, checkpoints and the best IRM. When it already holds
            an interrupted run of the same configuration, training continues from its last
            checkpoint (``resume=False`` refuses to touch it instead).
        resume: Continue an interrupted run found in ``out_dir``.
        progress: Show a progress bar.

    Returns:
        A ``TrainResult``; ``result.irm`` is ``irm`` loaded with the best weights.

    Under ``torchrun`` (or in a process group the caller started) each process trains its
    share of every global batch and DDP averages the gradients: see ``irm_lens.distributed``.
    Every rank returns the same result; only rank 0 writes to ``out_dir``.

    Example:
        >>> result = irm_lens.train(model, irm, "anger", TrainConfig(max_steps=300),
        ...                         out_dir="runs/anger")  # doctest: +SKIP
    """
    ranks = Ranks.setup(model.cfg.device)
    try:
        lock = _RunLock(Path(out_dir)) if out_dir is not None and ranks.main else nullcontext()
        with lock:
            return _train(model, irm, data, config, out_dir=out_dir, resume=resume,
                          progress=progress, ranks=ranks)
    finally:
        ranks.close()


def _train(
    model: HookedTransformer,
    irm: IRM,
    data: TextSplits | Iterable[str] | str,
    config: TrainConfig,
    *,
    out_dir: str | Path | None,
    resume: bool,
    progress: bool,
    ranks: Ranks,
) -> TrainResult:
    start = time.perf_counter()
    irm.check_compatible(model)
    if out_dir is not None and resume and not ranks.distributed:
        finished = _finished_run(_RunDir(Path(out_dir)), model, irm, data, config)
        if finished is not None:
            return replace(finished, wall_time_s=time.perf_counter() - start)
    loop = _Loop.prepare(model, irm, data, config, ranks, Path(out_dir) if out_dir else None)
    state = loop.state
    if loop.run is not None:
        loop.resume(resume)
    if math.isnan(state.baseline_val_loss):
        state.baseline_val_loss = _val_loss(model, None, loop.val_obj, config, ranks)
        _log(loop.writer, {"step": 0, "val_loss_no_irm": state.baseline_val_loss})
    bar = progress_bar(total=loop.total_steps, initial=state.step, desc="training IRM",
                       unit="step", disable=not progress or not ranks.main)
    while state.step < loop.total_steps and not state.stop_reason:
        record = loop.step()
        if record is None:  # a non-finite loss: rolled back, stop_reason says so
            break
        bar.update(1)
        bar.set_postfix(loss=f"{record['lm_loss']:.3f}", best_val=f"{state.best_val_loss:.3f}")
        loop.evaluate_and_checkpoint()
    bar.close()
    ranks.barrier()  # rank 0's files are complete before any rank reads them
    if not state.stop_reason:  # resumed a run that had already finished
        state.stop_reason = f"reached {loop.total_steps} steps"
    history = loop.finish()
    return TrainResult(
        irm=irm,
        out_dir=loop.run.path if loop.run is not None else None,
        steps=state.step,
        best_step=state.best_step,
        best_val_loss=state.best_val_loss,
        baseline_val_loss=state.baseline_val_loss,
        stop_reason=state.stop_reason,
        history=history,
        wall_time_s=time.perf_counter() - start,
    )


def _finished_run(run: _RunDir, model: HookedTransformer, irm: IRM, data, config: TrainConfig
                  ) -> TrainResult | None:
    """The result of the run in ``run`` when it is the same run and has finished (no step
    left under ``config``), read from its files without building the objective (for a
    preference objective that means the reference model's margins: minutes); else None."""
    run_json = run.path / "run.json"
    latest = run.latest_checkpoint() if run_json.is_file() else None
    if latest is None or not run.best_irm.is_file():
        return None
    previous = json.loads(run_json.read_text())
    splits = _as_splits(data, config.seed)
    current = {"model": model.cfg.model_name, "irm_config": irm.config.to_dict(),
               "train_config": config.to_dict(), "data": {"fingerprint": splits.fingerprint()}}
    try:
        _check_same_run(previous, current, run.path)
    except ConfigError:
        return None  # the full path explains the difference
    state = _LoopState(**json.loads(_read_checkpoint(latest)[1]["state"]))
    steps_per_epoch = previous["data"]["steps_per_epoch"]
    total_steps = min(config.max_epochs * steps_per_epoch, config.max_steps or math.inf)
    stopped = state.stop_reason and (state.bad_evals >= config.patience
                                     or state.stop_reason.startswith("non-finite"))
    if state.best_step < 0 or not (state.step >= total_steps or stopped):
        return None
    device = next(irm.parameters()).device
    irm.load_state_dict(IRM.load(run.best_irm, device=device).state_dict())
    logger.info("%s holds this run, finished at step %d: its best IRM is loaded.",
                run.path, state.step)
    return TrainResult(
        irm=irm, out_dir=run.path, steps=state.step, best_step=state.best_step,
        best_val_loss=state.best_val_loss, baseline_val_loss=state.baseline_val_loss,
        stop_reason=state.stop_reason or f"reached {total_steps} steps",
        history=run.history(), wall_time_s=0.0,
    )


@dataclass
class _Loop:
    """One training run's fixed parts (model, IRM, objectives, schedule, optimiser, run
    directory) and its mutable ``state``; ``step`` and ``evaluate_and_checkpoint`` advance it."""

    model: HookedTransformer
    irm: IRM
    config: TrainConfig
    ranks: Ranks
    train_obj: Any
    val_obj: Any
    kl_tok: TokenizedTexts | None
    steps_per_epoch: int
    total_steps: int
    eval_every: int
    provenance: dict[str, Any]
    run: _RunDir | None
    rank_batch: int  # this rank's share of a batch
    optimizer: torch.optim.Optimizer = field(init=False)
    scheduler: Any = field(init=False)
    state: _LoopState = field(default_factory=_LoopState)
    best_weights: dict[str, Tensor] | None = None  # in-memory runs keep the best IRM here
    epoch_order: dict[int, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.Adam(self.irm.parameters(), lr=self.config.lr)
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=self.config.lr_step_size or self.steps_per_epoch,
            gamma=self.config.lr_gamma,
        )

    @cached_property
    def forward_irm(self):
        """What the training forward calls: the IRM, or DDP's wrapper when distributed (made
        at the first step, after any resume has restored the weights)."""
        return self.ranks.wrap(self.irm)

    @property
    def writer(self) -> _RunDir | None:
        return self.run if self.ranks.main else None  # only rank 0 writes

    @classmethod
    def prepare(cls, model, irm, data, config: TrainConfig, ranks: Ranks, out_dir: Path | None):
        rank_batch = ranks.check_batch(config.batch_size)  # before the (slow) tokenisation
        splits = _as_splits(data, config.seed)
        _check_steer(irm, config, splits)
        train_obj, val_obj = split_objectives(model, splits, config)
        steps_per_epoch = math.ceil(len(train_obj) / config.batch_size)
        total_steps = config.max_epochs * steps_per_epoch
        if config.max_steps is not None:
            total_steps = min(total_steps, config.max_steps)
        provenance = {
            "model": model.cfg.model_name,
            "irm_config": irm.config.to_dict(),
            "train_config": config.to_dict(),
            "data": {
                "fingerprint": splits.fingerprint(),
                "description": data if isinstance(data, str) else "user texts",
                "n_train": len(splits.train),
                "n_val": len(splits.val),
                "n_test": len(splits.test),
                "n_train_truncated": train_obj.n_truncated,
                "steps_per_epoch": steps_per_epoch,
            },
        }
        return cls(model, irm, config, ranks, train_obj, val_obj, _fluency_texts(model, config),
                   steps_per_epoch, total_steps, config.eval_every or steps_per_epoch, provenance,
                   _RunDir(out_dir) if out_dir is not None else None, rank_batch)

    def resume(self, resume: bool) -> None:
        """Continue the run directory's run, if it has one (checked to be the same run)."""
        run, state, config = self.run, self.state, self.config
        resumed = self.ranks.broadcast(run.prepare(self.provenance, resume) if self.ranks.main
                                       else None)
        if resumed is None:
            return
        run.restore(resumed, self.irm, self.optimizer, self.scheduler, state)
        logger.info("Resuming %s from step %d.", run.path, state.step)
        if (state.stop_reason and state.step < self.total_steps
                and state.bad_evals < config.patience
                and not state.stop_reason.startswith("non-finite")):
            state.stop_reason = ""  # a finished run given a longer budget continues

    def _batch(self) -> tuple[int, Batch]:
        """This step's epoch and this rank's share of its batch."""
        epoch, i = divmod(self.state.step, self.steps_per_epoch)
        if epoch not in self.epoch_order:
            self.epoch_order.clear()
            self.epoch_order[epoch] = self.ranks.epoch_order(
                len(self.train_obj), self.config.seed * 1_000_003, epoch)
        index = self.epoch_order[epoch][i * self.rank_batch : (i + 1) * self.rank_batch]
        return epoch, self.train_obj.batch(index).to(self.model.cfg.device)

    def _losses(self, batch: Batch) -> tuple[Tensor, list[float]]:
        """This rank's loss to backpropagate, and the global batch's (lm, l1, kl, entropy) for the
        log."""
        model, irm, config, ranks = self.model, self.irm, self.config, self.ranks
        mask = batch.mask
        device = next(irm.parameters()).device
        penalty = {name: torch.zeros((), device=device) for name in ("l1", "kl", "entropy")}

        def capture(out: Tensor) -> None:
            if config.l1 > 0:  # per-token L1 norm of everything injected, mean over real tokens
                per_token = out.abs().sum(dim=(-1, -2))  # [batch, pos]
                penalty["l1"] = (per_token * mask).sum() / mask.sum()

        with inject(model, self.forward_irm, on_output=capture,
                    positions=_steered(irm, batch.scored)):
            logits = logits_at(model, batch.ids, predicting(batch.scored))  # [n_scored, d_vocab]
        lm_loss = self.train_obj.loss(logits, batch)  # the objective's loss
        lm_weight, l1_weight = _rank_weights(ranks, torch.tensor(batch.n_units), mask.sum())
        loss = lm_loss * lm_weight
        if config.l1 > 0:
            loss = loss + config.l1 * penalty["l1"] * l1_weight
        if config.kl > 0:
            which = kl_batch(self.kl_tok, self.state.step * ranks.world_size + ranks.rank,
                             self.rank_batch)
            kl_ids, kl_mask, _ = (t.to(model.cfg.device) for t in batch_slice(self.kl_tok, which))
            penalty["kl"] = kl_to_unsteered(model, self.forward_irm, kl_ids, kl_mask,
                                            lambda m: _steered(irm, m))
            loss = loss + config.kl * penalty["kl"]
        if config.entropy > 0:
            penalty["entropy"] = entropy_shortfall(model, logits, batch.ids, batch.scored)
            loss = loss + config.entropy * penalty["entropy"]
        # the global batch's losses (token-weighted over ranks), for the log and the check
        local = torch.stack([lm_loss.detach() * lm_weight, penalty["l1"].detach() * l1_weight,
                             penalty["kl"].detach(), penalty["entropy"].detach()])
        return loss, (ranks.sum(local.double().cpu()) / ranks.world_size).tolist()

    def step(self) -> dict[str, Any] | None:
        """One optimiser step and its log record; None (rolled back) on a non-finite loss."""
        config, state = self.config, self.state
        epoch, batch = self._batch()
        loss, (global_lm, global_l1, global_kl, global_entropy) = self._losses(batch)
        global_loss = (global_lm + config.l1 * global_l1 + config.kl * global_kl
                       + config.entropy * global_entropy)
        if not math.isfinite(global_loss):
            state.stop_reason = _roll_back(self.run, self.irm, state.step)
            return None
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.irm.parameters(), config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        state.step += 1
        record = {"step": state.step, "epoch": epoch, "loss": global_loss, "lm_loss": global_lm,
                  "lr": self.optimizer.param_groups[0]["lr"]}
        if config.l1 > 0:
            record["l1_norm"] = global_l1
        if config.kl > 0:
            record["kl"] = global_kl
        if config.entropy > 0:
            record["entropy_shortfall"] = global_entropy
        _log(self.writer, record)
        return record

    def evaluate_and_checkpoint(self) -> None:
        """Validate when due (keeping the best IRM, stopping early), and checkpoint when due."""
        config, state, writer = self.config, self.state, self.writer
        last = state.step == self.total_steps
        if state.step % self.eval_every == 0 or last:
            val = _val_loss(self.model, self.irm, self.val_obj, config, self.ranks)
            _log(writer, {"step": state.step, "val_loss": val, "val_perplexity": math.exp(val)})
            if val < state.best_val_loss:
                state.best_val_loss, state.best_step, state.bad_evals = val, state.step, 0
                if writer is not None:
                    self.irm.save(writer.best_irm)  # every rank reads it back at the end
                elif self.run is None:
                    self.best_weights = {k: v.detach().clone()
                                         for k, v in self.irm.state_dict().items()}
            else:
                state.bad_evals += 1
                if state.bad_evals >= config.patience:
                    state.stop_reason = (
                        f"early stopping: no validation improvement in {config.patience} "
                        f"evaluations (best at step {state.best_step})"
                    )
        if last and not state.stop_reason:
            state.stop_reason = f"reached {self.total_steps} steps"
        if writer is not None and (state.step % config.checkpoint_every == 0 or state.stop_reason):
            writer.save_checkpoint(self.irm, self.optimizer, self.scheduler, state,
                                   config.keep_checkpoints)

    def finish(self) -> pd.DataFrame:
        """Load the best IRM into ``irm``; the run's history (written as metrics.csv)."""
        device = next(self.irm.parameters()).device
        if self.run is not None and self.state.best_step >= 0:
            self.irm.load_state_dict(IRM.load(self.run.best_irm, device=device).state_dict())
        elif self.best_weights is not None:
            self.irm.load_state_dict(self.best_weights)
        history = self.run.history() if self.run is not None else pd.DataFrame()
        if self.writer is not None:
            atomic_write_text(self.writer.path / "metrics.csv", history.to_csv(index=False))
        self.ranks.barrier()
        return history


def split_objectives(model: HookedTransformer, splits: TextSplits, config: TrainConfig
                     ) -> tuple[LMObjective | PreferenceObjective, ...]:
    """The objectives ``train`` optimises and validates on: ``config.objective`` over the
    training and the validation split."""
    prompts = neutral_prompts(split="train") if config.chat_prompts else None

    def objective_of(examples):
        return build_objective(model, examples, objective=config.objective,
                               max_length=config.max_length, beta=config.beta,
                               chosen_lm=config.chosen_lm, prompts=prompts)

    return objective_of(splits.train), objective_of(splits.val)


def _check_steer(irm: IRM, config: TrainConfig, splits: TextSplits) -> None:
    all_chat = all(isinstance(x, tuple) for part in (splits.train, splits.val) for x in part)
    if irm.config.steer == "reply" and not (config.chat_prompts or all_chat):
        raise ConfigError(
            "An IRM with steer='reply' steers only a chat reply: train it on chat examples "
            "((prompt, reply) pairs, or TrainConfig(chat_prompts=True), --chat)."
        )


def _as_splits(data: TextSplits | Iterable[str] | str, seed: int) -> TextSplits:
    if isinstance(data, TextSplits):
        return data
    if isinstance(data, str):
        return split_texts(load_alignment(data).texts, seed=seed)
    return split_texts(list(data), seed=seed)


def _rank_weights(ranks: Ranks, n_scored: Tensor, n_real: Tensor) -> tuple[float, float]:
    """Factors on this rank's token-mean LM loss and L1 penalty such that DDP's average of the
    ranks' gradients is the gradient of the global batch's token means (1.0 when single)."""
    if not ranks.distributed:
        return 1.0, 1.0
    counts = ranks.sum(torch.stack([n_scored.detach().double().cpu(), n_real.detach().double().cpu()]))
    w = ranks.world_size
    return (w * float(n_scored) / max(float(counts[0]), 1.0),
            w * float(n_real) / max(float(counts[1]), 1.0))


@torch.no_grad()
def _val_loss(
    model: HookedTransformer, irm: IRM | None, objective: LMObjective | PreferenceObjective,
    config: TrainConfig, ranks: Ranks | None = None,
) -> float:
    """The objective's mean over the validation split (with the IRM when given), weighted by
    each batch's units (scored tokens, or pairs); when distributed, each rank scores every
    ``world_size``-th batch and the sums are reduced."""
    ranks = ranks or Ranks()
    total, count = 0.0, 0
    n_batches = math.ceil(len(objective) / config.batch_size)
    if config.max_val_batches is not None:
        n_batches = min(n_batches, config.max_val_batches)
    for b in range(ranks.rank, n_batches, ranks.world_size):
        index = torch.arange(b * config.batch_size, min((b + 1) * config.batch_size, len(objective)))
        batch = objective.batch(index).to(model.cfg.device)
        where = predicting(batch.scored)
        steering = (nullcontext() if irm is None
                    else inject(model, irm, positions=_steered(irm, batch.scored)))
        with steering:
            logits = logits_at(model, batch.ids, where)
        total += objective.loss(logits, batch).item() * batch.n_units
        count += batch.n_units
    if ranks.distributed:
        total, count = ranks.sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
    return total / max(count, 1)


def _fluency_texts(model: HookedTransformer, config: TrainConfig) -> TokenizedTexts | None:
    """The neutral texts of the fluency (KL) term, tokenised as the training data is."""
    if config.kl == 0:
        return None
    return tokenize_texts(model, load_alignment("neutral").texts, max_length=config.max_length)


def _steered(irm: IRM, scored: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos"] | None:
    """The positions an IRM with ``steer="reply"`` acts on: each scored (reply) token and the
    position that predicts it. ``None`` (every position) for ``steer="all"``."""
    if irm.config.steer == "all":
        return None
    steered = scored.clone()
    steered[:, :-1] |= scored[:, 1:]
    return steered.float()


def _log(run: _RunDir | None, record: dict[str, Any]) -> None:
    if run is not None:
        run.log(record)


def _roll_back(run: _RunDir | None, irm: IRM, step: int) -> str:
    message = f"non-finite loss at step {step + 1}"
    latest = run.latest_checkpoint() if run is not None else None
    if latest is None:
        logger.warning("%s; no checkpoint to roll back to.", message)
        return message + "; no earlier checkpoint, IRM left at its last finite state"
    tensors, meta = _read_checkpoint(latest)
    irm.load_state_dict(_irm_weights(tensors))
    good = json.loads(meta["state"])["step"]
    logger.warning("%s; IRM rolled back to the checkpoint of step %d.", message, good)
    return message + f"; IRM rolled back to the checkpoint of step {good}"


def _irm_weights(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The IRM's state dict inside a checkpoint's tensors (stored under ``irm.``)."""
    return {k.removeprefix("irm."): v for k, v in tensors.items() if k.startswith("irm.")}


def _read_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors' own error types for malformed files
        raise CheckpointError(f"{path} is not a readable checkpoint: {exc}") from exc
    if meta.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not an irm_lens training checkpoint.")
    return tensors, meta


def run_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """The step checkpoints a run directory holds, by step, oldest first (``keep_checkpoints``
    decides how many training left there)."""
    files = sorted(_RunDir(Path(run_dir)).checkpoints.glob("step-*.safetensors"))
    return {int(f.stem[len("step-"):]): f for f in files if f.stem[len("step-"):].isdigit()}


def checkpoint_irm(path: str | Path) -> tuple[int, IRM]:
    """The IRM inside a step checkpoint (on CPU, without the optimiser) and its step."""
    tensors, meta = _read_checkpoint(Path(path))
    try:
        irm = IRM(IRMConfig.from_dict(json.loads(meta["irm_config"])))
        irm.load_state_dict(_irm_weights(tensors))
        return int(json.loads(meta["state"])["step"]), irm
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:  # ConfigError is a ValueError
        raise CheckpointError(f"{path}: its IRM cannot be rebuilt: {exc}") from exc


class _RunLock:
    """An exclusive lock on a run directory: two trainers writing one run would interleave
    its metrics and checkpoints. Released on exit, or by the OS if the process dies."""

    def __init__(self, path: Path):
        self.path = path
        self._file = None

    def __enter__(self) -> _RunLock:
        import fcntl

        _ensure_writable_dir(self.path)
        self._file = open(self.path / ".lock", "w")  # noqa: SIM115 - held until __exit__
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._file.close()
            raise ConfigError(
                f"Another process is training in {self.path}. Wait for it, stop it, or use "
                "another out_dir."
            ) from exc
        return self

    def __exit__(self, *exc_info) -> None:
        self._file.close()  # closing the file releases the lock


class _RunDir:
    """The files of one training run (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = path
        self.best_irm = path / "irm.safetensors"
        self.checkpoints = path / "checkpoints"
        self.metrics = path / "metrics.jsonl"

    def prepare(self, provenance: dict[str, Any], resume: bool) -> Path | None:
        """Check an existing run against this one; return the checkpoint to resume, if any."""
        # half-written temporary files of a killed writer (the run lock is held: nobody else
        # writes here now)
        for stale in (*self.path.glob(".*.tmp"), *self.checkpoints.glob(".*.tmp")):
            stale.unlink(missing_ok=True)
        run_json = self.path / "run.json"
        if run_json.is_file():
            previous = json.loads(run_json.read_text())
            if not resume:
                raise ConfigError(
                    f"{self.path} already holds a training run. Use another out_dir, delete it, "
                    "or pass resume=True to continue it."
                )
            _check_same_run(previous, provenance, self.path)
            latest = self.latest_checkpoint()
            if latest is not None:
                self._truncate_metrics(int(json.loads(_read_checkpoint(latest)[1]["state"])["step"]))
                atomic_write_json(run_json, provenance)
                return latest
        self.metrics.unlink(missing_ok=True)
        atomic_write_json(run_json, provenance)
        return None

    def latest_checkpoint(self) -> Path | None:
        """The newest readable checkpoint: latest.json's, else the newest file that loads."""
        pointer = self.path / "latest.json"
        candidates = sorted(self.checkpoints.glob("step-*.safetensors"), reverse=True)
        try:
            named = self.path / json.loads(pointer.read_text())["checkpoint"]
            candidates.insert(0, named)
        except (OSError, ValueError, KeyError, TypeError):
            pass
        for candidate in candidates:
            try:
                _read_checkpoint(candidate)
                return candidate
            except CheckpointError as exc:
                logger.warning("Skipping unusable checkpoint %s (%s).", candidate, exc)
        return None

    def restore(self, checkpoint: Path, irm: IRM, optimizer, scheduler, state: _LoopState) -> None:
        tensors, meta = _read_checkpoint(checkpoint)
        irm.load_state_dict(_irm_weights(tensors))
        optim_meta = json.loads(meta["optimizer"])
        optim_state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                optim_state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": optim_state, "param_groups": optim_meta})
        scheduler.load_state_dict(json.loads(meta["scheduler"]))
        for key, value in json.loads(meta["state"]).items():
            setattr(state, key, value)

    def save_checkpoint(self, irm: IRM, optimizer, scheduler, state: _LoopState, keep: int) -> Path:
        """Write this step's checkpoint and delete all but the newest ``keep`` (0: keep all)."""
        from safetensors.torch import save_file

        tensors = {f"irm.{k}": v.detach().cpu().contiguous() for k, v in irm.state_dict().items()}
        optim = optimizer.state_dict()
        for index, values in optim["state"].items():
            for name, value in values.items():
                tensors[f"optim.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
        metadata = {
            "format": _FORMAT,
            "irm_config": json.dumps(irm.config.to_dict()),
            "optimizer": json.dumps(optim["param_groups"]),
            "scheduler": json.dumps(scheduler.state_dict()),
            "state": json.dumps(asdict(state)),
        }
        path = self.checkpoints / f"step-{state.step:07d}.safetensors"
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        atomic_write_json(self.path / "latest.json",
                          {"checkpoint": str(path.relative_to(self.path)), "step": state.step})
        stale = sorted(self.checkpoints.glob("step-*.safetensors"))[:-keep] if keep else []
        for old in stale:
            old.unlink(missing_ok=True)
        return path

    def log(self, record: dict[str, Any]) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """Drop what was logged after the checkpoint: those steps will be run again."""
        if not self.metrics.is_file():
            return
        kept = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by the interruption
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.metrics, "".join(line + "\n" for line in kept))

    def history(self) -> pd.DataFrame:
        if not self.metrics.is_file():
            return pd.DataFrame()
        rows = [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]
        return pd.DataFrame(rows)


def _check_same_run(previous: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    problems = []
    if previous.get("irm_config") != current["irm_config"]:
        problems.append("the IRM config")
    if previous.get("data", {}).get("fingerprint") != current["data"]["fingerprint"]:
        problems.append("the data")
    if previous.get("model") != current["model"]:
        problems.append("the model")
    # a run written before a field existed ran with that field's default
    earlier = {**TrainConfig().to_dict(), **previous.get("train_config", {})}
    before = {k: v for k, v in earlier.items() if k not in _RESUMABLE_CHANGES}
    now = {k: v for k, v in current["train_config"].items() if k not in _RESUMABLE_CHANGES}
    if before != now:
        changed = sorted(k for k in now if before.get(k) != now[k])
        problems.append(f"the training config ({', '.join(changed)})")
    if problems:
        raise ConfigError(
            f"{path} holds a run with different {', '.join(problems)}; it cannot be resumed with "
            "these settings. Use another out_dir, or the original settings."
        )
